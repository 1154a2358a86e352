//! Unit tests of the core without sockets or disk: events in, mutations and effects out.

use std::sync::Arc;

use tether_proto::msg::{
    CoordMsg, Disposition, Inventory, Registration, TaskAssignment, TaskResult, WorkerMsg, now,
};
use tether_proto::{Attempt, Outcome, Seq, TaskId, TaskSpec, TaskStatus, WorkerId};

use super::{Api, Core, Counters, Event, Outgoing, SessionRef};
use crate::config::CoordinatorConfig;
use crate::model::WorkerState;
use crate::store::{Batch, Loaded};

struct Harness {
    core: Core,
    conn: rusqlite::Connection,
    next_session: u64,
    /// What the last step wrote to the store.
    last_muts: Vec<crate::store::Mutation>,
}

impl Harness {
    fn new() -> Self {
        Self::with(CoordinatorConfig::new("/nonexistent"))
    }

    fn with(cfg: CoordinatorConfig) -> Self {
        Self::from_store(cfg, Loaded::default())
    }

    /// A core rebuilt from what a store held.
    fn from_store(cfg: CoordinatorConfig, loaded: Loaded) -> Self {
        Self {
            core: Core::new(Arc::new(cfg), loaded, Arc::new(Counters::default())),
            conn: rusqlite::Connection::open_in_memory().expect("sqlite"),
            next_session: 1,
            last_muts: Vec::new(),
        }
    }

    /// Applies one event, dispatches, runs the effects.
    fn step(&mut self, ev: Event) {
        let mut b = Batch::default();
        self.core.apply(ev, &mut b);
        if self.core.dispatch_needed {
            self.core.dispatch_needed = false;
            self.core.dispatch(&mut b);
        }
        self.last_muts = std::mem::take(&mut b.muts);
        for e in b.effects {
            e.run(&self.conn);
        }
        assert!(
            self.core.listing.matches(self.core.tasks.values()),
            "the listing's indexes hold every task as it is"
        );
    }

    fn connect(&mut self, worker: &str) -> (u64, super::mailbox::Receiver<Outgoing>) {
        self.connect_with(worker, false)
    }

    /// Connects and registers `worker`, offering compact acknowledgements or not.
    fn connect_with(
        &mut self,
        worker: &str,
        compact_acks: bool,
    ) -> (u64, super::mailbox::Receiver<Outgoing>) {
        self.connect_registering(worker, |r| r.compact_acks = compact_acks)
    }

    /// Connects and registers `worker` with the registration `edit` makes of the usual one.
    fn connect_registering(
        &mut self,
        worker: &str,
        edit: impl FnOnce(&mut Registration),
    ) -> (u64, super::mailbox::Receiver<Outgoing>) {
        let (tx, rx) = super::mailbox::channel();
        let id = self.next_session;
        self.next_session += 1;
        let mut registration = registration(worker);
        edit(&mut registration);
        self.step(Event::Connected {
            worker: wid(worker),
            session: SessionRef::new(id, tx),
            registration: Box::new(registration),
        });
        (id, rx)
    }

    /// A session of `worker` whose registration the core refuses (another protocol): the
    /// connection is there, the worker never registered on it.
    fn connect_refused(&mut self, worker: &str, id: u64) -> super::mailbox::Receiver<Outgoing> {
        let (tx, rx) = super::mailbox::channel();
        self.step(Event::Connected {
            worker: wid(worker),
            session: SessionRef::new(id, tx),
            registration: Box::new(Registration {
                protocol_version: 99,
                ..registration(worker)
            }),
        });
        rx
    }

    fn frame(&mut self, worker: &str, session_id: u64, msg: WorkerMsg) {
        self.step(Event::Frame {
            worker: wid(worker),
            session_id,
            msgs: vec![msg],
        });
    }

    /// `worker`'s session ends and the worker is taken for lost: `task` goes back to the
    /// queue (or fails, its attempts used up). The batch holds what that wrote.
    fn lose(&mut self, worker: &str, session_id: u64, task: &TaskId) -> Batch {
        self.step(Event::Disconnected {
            worker: wid(worker),
            session_id,
        });
        let mut b = Batch::default();
        self.core.release_and_requeue(task, "worker lost", &mut b);
        b
    }

    /// A task leased to worker `a`, then lost with it (queued again, or failed once its
    /// attempts are used up).
    fn lost_on_a(&mut self) -> TaskId {
        let (sa, mut rxa) = self.connect("a");
        let t = self.submit();
        drain(&mut rxa);
        self.lose("a", sa, &t);
        t
    }

    /// Connects `worker`, which must be assigned a task's `attempt`: its session and mailbox.
    fn assigned(
        &mut self,
        worker: &str,
        attempt: Attempt,
    ) -> (u64, super::mailbox::Receiver<Outgoing>) {
        let (s, mut rx) = self.connect(worker);
        assert!(
            drain(&mut rx)
                .iter()
                .any(|m| matches!(m, CoordMsg::TaskAssignment(x) if x.attempt == attempt)),
            "{worker} is assigned attempt {attempt}"
        );
        (s, rx)
    }

    fn submit(&mut self) -> TaskId {
        self.submit_spec(TaskSpec::new("sleep", serde_json::json!({})))
    }

    fn submit_spec(&mut self, spec: TaskSpec) -> TaskId {
        self.try_submit(vec![spec])
            .expect("submitted")
            .task_ids
            .remove(0)
    }

    /// The core's answer to a submission of `specs`.
    fn try_submit(&mut self, specs: Vec<TaskSpec>) -> Result<super::Submission, super::ApiError> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        self.step(Event::Api(Api::Submit { specs, reply: tx }));
        rx.try_recv().expect("reply")
    }

    /// Cancels `task` through the API.
    fn cancel(&mut self, task: &TaskId) {
        let (tx, mut reply) = tokio::sync::oneshot::channel();
        self.step(Event::Api(Api::Control {
            task: task.clone(),
            op: super::ControlOp::Cancel,
            reply: tx,
        }));
        reply.try_recv().expect("reply").expect("cancelled");
    }
}

/// The registration of `worker` these tests start from: one slot for `sleep`, nothing agreed
/// but checkpoint fetches.
fn registration(worker: &str) -> Registration {
    Registration {
        worker_id: wid(worker),
        protocol_version: tether_proto::PROTOCOL_VERSION,
        boot_id: "b".into(),
        capabilities: vec![],
        tags: Default::default(),
        slots: 1,
        executors: vec!["sleep".into()],
        inventory: Inventory::default(),
        signature: None,
        compression: Vec::new(),
        client_nonce: None,
        batching: false,
        compact_acks: false,
        max_frame: None,
        checkpoint_fetch: true,
        heartbeat_timeout_ms: None,
        timestamp: now(),
    }
}

fn wid(s: &str) -> WorkerId {
    WorkerId::parse(s).expect("id")
}

fn drain(rx: &mut super::mailbox::Receiver<Outgoing>) -> Vec<CoordMsg> {
    let mut v = Vec::new();
    while let Ok(Outgoing::Msg(m)) = rx.try_recv() {
        v.push(*m);
    }
    v
}

/// What the mailbox holds, in order: messages by type name, acknowledgements by number as
/// `recorded <seq>`, closes as `close`.
fn sent_names(rx: &mut super::mailbox::Receiver<Outgoing>) -> Vec<String> {
    let mut got = Vec::new();
    while let Ok(o) = rx.try_recv() {
        got.push(match o {
            Outgoing::Recorded(seq) => format!("recorded {}", seq.0),
            Outgoing::Msg(m) => m.type_name().to_string(),
            Outgoing::Close(_) => "close".into(),
            Outgoing::Piece(p) => p.0.type_name().to_string(),
        });
    }
    got
}

/// The code of the first close in the mailbox, if any.
fn close_code(rx: &mut super::mailbox::Receiver<Outgoing>) -> Option<u16> {
    close(rx).map(|c| c.0)
}

/// The first close in the mailbox, if any: its code and reason.
fn close(rx: &mut super::mailbox::Receiver<Outgoing>) -> Option<(u16, String)> {
    while let Ok(out) = rx.try_recv() {
        if let Outgoing::Close(c) = out {
            return Some(*c);
        }
    }
    None
}

/// A registration edit giving it the boot id `b` (one process of the worker).
fn boot(b: &'static str) -> impl FnOnce(&mut Registration) {
    move |r: &mut Registration| r.boot_id = b.into()
}

fn result(seq: u64, task: &TaskId, attempt: u32) -> WorkerMsg {
    WorkerMsg::TaskResult(TaskResult {
        seq: Seq(seq),
        task_id: task.clone(),
        attempt: Attempt(attempt),
        outcome: Outcome::Completed,
        result: serde_json::json!({}).into(),
        error: None,
        worker_fault: false,
        started_at: now(),
        finished_at: now(),
        duration_ms: 1,
        timestamp: now(),
    })
}

/// The disposition of the first acknowledgement of type `ty` in `msgs`.
fn ack_of(msgs: &[CoordMsg], ty: &str) -> Disposition {
    msgs.iter()
        .filter(|m| m.type_name() == ty)
        .find_map(|m| match m {
            CoordMsg::TaskResultAck(a) => Some(a.disposition),
            m => m.message_ack().map(|a| a.disposition),
        })
        .unwrap_or_else(|| panic!("a {ty} in {msgs:?}"))
}

fn result_ack(msgs: &[CoordMsg]) -> Disposition {
    ack_of(msgs, "task_result_ack")
}

/// The disposition and `reason` of the first `task_result_ack` in `msgs`.
fn result_ack_why(msgs: &[CoordMsg]) -> (Disposition, String) {
    msgs.iter()
        .find_map(|m| match m {
            CoordMsg::TaskResultAck(a) => {
                Some((a.disposition, a.reason.clone().unwrap_or_default()))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("a task_result_ack in {msgs:?}"))
}

#[test]
fn a_resent_result_is_acknowledged_as_duplicate_and_counted_once() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    assert!(
        drain(&mut rx)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(_)))
    );
    h.frame("a", s, result(1, &t, 1));
    // Only a stale ack says why.
    assert_eq!(
        result_ack_why(&drain(&mut rx)),
        (Disposition::Recorded, String::new())
    );
    h.frame("a", s, result(2, &t, 1));
    assert_eq!(
        result_ack_why(&drain(&mut rx)),
        (Disposition::Duplicate, String::new())
    );
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Completed);
    assert_eq!(Counters::get(&h.core.counters.results_recorded), 1);
    assert_eq!(Counters::get(&h.core.counters.results_duplicate), 1);
}

#[test]
fn a_result_of_an_attempt_that_lost_its_lease_is_stale_once_another_counted_and_one_from_a_stranger_is_rejected()
 {
    let mut h = Harness::new();
    // a goes away; its lease is released and the task requeued (attempt 2 goes to b).
    let t = h.lost_on_a();
    let (sb, mut rxb) = h.assigned("b", Attempt(2));
    // c never held the task.
    let (sc, mut rxc) = h.connect("c");
    h.frame("c", sc, result(1, &t, 2));
    let msgs = drain(&mut rxc);
    assert_eq!(result_ack(&msgs), Disposition::Rejected);
    assert!(msgs.iter().any(
        |m| matches!(m, CoordMsg::Error(e) if e.code == tether_proto::msg::ErrorCode::NotLeased)
    ));
    // b's result counts.
    h.frame("b", sb, result(1, &t, 2));
    assert_eq!(result_ack(&drain(&mut rxb)), Disposition::Recorded);
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Completed);
    // a comes back with its late result for attempt 1: kept as stale, not counted.
    let (sa2, mut rxa2) = h.connect("a");
    h.frame("a", sa2, result(1, &t, 1));
    assert_eq!(
        result_ack_why(&drain(&mut rxa2)),
        (
            Disposition::Stale,
            "attempt 1 no longer counts: the attempt's lease was lost with its worker (away past its grace, --lost-after, or its process replaced); it ended completed".into()
        ),
        "the ack says why, for the worker's log"
    );
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Completed);
    assert_eq!(
        h.core.tasks[&t].attempts[1].end.as_deref(),
        Some("completed")
    );
    assert_eq!(Counters::get(&h.core.counters.results_stale), 1);
    assert_eq!(Counters::get(&h.core.counters.results_recorded), 1);
    assert_eq!(Counters::get(&h.core.counters.results_adopted), 0);
    assert_eq!(Counters::get(&h.core.counters.rejected), 1);
}

/// First finished, first counted: a worker away past the grace period comes back with its
/// attempt finished while the task's next attempt runs on another worker. The finished
/// work is counted, not thrown away, and the attempt that replaced it is stopped; its own
/// result, when it comes, is kept stale.
#[test]
fn a_late_finished_result_is_counted_when_the_task_has_none_and_the_attempt_that_replaced_it_is_stopped()
 {
    let mut h = Harness::new();
    let t = h.lost_on_a();
    let (sb, mut rxb) = h.assigned("b", Attempt(2));
    let (sa2, mut rxa2) = h.connect("a");
    drain(&mut rxa2);
    h.frame("a", sa2, result(1, &t, 1));
    assert_eq!(result_ack(&drain(&mut rxa2)), Disposition::Recorded);
    let task = &h.core.tasks[&t];
    assert_eq!(task.status, TaskStatus::Completed);
    assert_eq!(task.lease, None);
    assert_eq!(task.attempts[0].end.as_deref(), Some("completed"));
    assert!(task.attempts[0].result_recorded);
    assert_eq!(task.attempts[1].end.as_deref(), Some("superseded"));
    assert!(
        drain(&mut rxb).iter().any(
            |m| matches!(m, CoordMsg::CancelTask(c) if c.task_id == t && c.attempt == Attempt(2))
        ),
        "b is told to stop the attempt that replaced a's"
    );
    assert!(!h.core.workers[&wid("b")].leases.contains(&t));
    h.frame("b", sb, result(1, &t, 2));
    let (disposition, why) = result_ack_why(&drain(&mut rxb));
    assert_eq!(disposition, Disposition::Stale);
    assert!(
        why.contains("a late result of an earlier attempt was counted instead; it ended completed"),
        "{why}"
    );
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Completed);
    assert_eq!(Counters::get(&h.core.counters.results_recorded), 1);
    assert_eq!(Counters::get(&h.core.counters.results_adopted), 1);
    assert_eq!(Counters::get(&h.core.counters.results_stale), 1);
    // The stored result of attempt 1 is the counted one.
    assert!(h.last_muts.iter().any(|m| matches!(
        m,
        crate::store::Mutation::PutResult { attempt, stale: true, .. } if *attempt == Attempt(2)
    )));
}

/// Only finished work of a lost lease is counted late: a result of an attempt the worker
/// stopped (`cancelled`), or that it could not run (a fault of its own), is kept stale and
/// the task runs again; so is a late result of a task cancelled meanwhile.
#[test]
fn a_late_result_that_is_not_finished_work_is_kept_stale() {
    for (case, edit) in [
        (
            "stopped",
            (|r: &mut TaskResult| r.outcome = Outcome::Cancelled) as fn(&mut TaskResult),
        ),
        ("a fault of the worker's", |r: &mut TaskResult| {
            r.outcome = Outcome::Failed;
            r.worker_fault = true;
        }),
    ] {
        let mut h = Harness::new();
        let t = h.lost_on_a();
        assert_eq!(h.core.tasks[&t].status, TaskStatus::Queued, "{case}");
        let (sa2, mut rxa2) = h.connect("a");
        drain(&mut rxa2);
        let WorkerMsg::TaskResult(mut r) = result(1, &t, 1) else {
            unreachable!()
        };
        edit(&mut r);
        h.frame("a", sa2, WorkerMsg::TaskResult(r));
        let (disposition, why) = result_ack_why(&drain(&mut rxa2));
        assert_eq!(disposition, Disposition::Stale, "{case}");
        assert!(
            why.ends_with("lost with its worker (away past its grace, --lost-after, or its process replaced); it runs as attempt 2 on worker a"),
            "{case}: {why}"
        );
        assert!(!h.core.tasks[&t].status.is_terminal(), "{case}");
        assert_eq!(Counters::get(&h.core.counters.results_adopted), 0, "{case}");
    }
}

/// A worker away past the grace period registers again holding the result of the attempt
/// it lost, while its task still waits in the queue: the lease goes back to it before the
/// dispatch (nothing is assigned again, to it or another), and the result the replay brings
/// counts as the holder's.
#[test]
fn a_worker_back_with_the_lost_attempt_finished_gets_its_lease_back_before_the_task_runs_again() {
    let mut h = Harness::new();
    let t = h.lost_on_a();
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Queued);
    let (sa2, mut rxa2) = h.connect_registering("a", |r| {
        r.inventory.finished = vec![tether_proto::task::TaskRef::new(t.clone(), Attempt(1))];
    });
    assert!(
        !drain(&mut rxa2)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(_))),
        "the task is not assigned again"
    );
    let task = &h.core.tasks[&t];
    assert_eq!(task.status, TaskStatus::Running);
    assert_eq!(task.attempt, Attempt(1));
    assert_eq!(task.lease.as_ref().map(|l| l.attempt), Some(Attempt(1)));
    assert_eq!(task.attempts.len(), 1);
    assert_eq!(task.attempts[0].end, None);
    assert_eq!(Counters::get(&h.core.counters.leases_restored), 1);
    // Another worker connecting meanwhile gets nothing of it.
    let (_sb, mut rxb) = h.connect("b");
    assert!(
        !drain(&mut rxb)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(_)))
    );
    h.frame("a", sa2, result(1, &t, 1));
    assert_eq!(result_ack(&drain(&mut rxa2)), Disposition::Recorded);
    let task = &h.core.tasks[&t];
    assert_eq!(task.status, TaskStatus::Completed);
    assert_eq!(task.attempts[0].end.as_deref(), Some("completed"));
    assert_eq!(Counters::get(&h.core.counters.results_recorded), 1);
    assert_eq!(Counters::get(&h.core.counters.results_stale), 0);
    // A worker that says nothing finished gets no lease back: the task runs again.
    let mut h = Harness::new();
    let (sc, mut rxc) = h.connect("c");
    let u = h.submit();
    drain(&mut rxc);
    h.lose("c", sc, &u);
    let (_sc2, mut rxc2) = h.connect("c");
    assert!(drain(&mut rxc2).iter().any(
        |m| matches!(m, CoordMsg::TaskAssignment(x) if x.task_id == u && x.attempt == Attempt(2))
    ));
    assert_eq!(Counters::get(&h.core.counters.leases_restored), 0);
}

#[test]
fn a_task_cancelled_while_running_stays_cancelled_when_its_completed_result_arrives() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    drain(&mut rx);
    h.cancel(&t);
    assert!(drain(&mut rx).iter().any(
        |m| matches!(m, CoordMsg::CancelTask(c) if c.task_id == t && c.attempt == Attempt(1))
    ));
    // The executor finished before the cancel reached it: its result is kept, not counted.
    h.frame("a", s, result(1, &t, 1));
    assert_eq!(
        result_ack_why(&drain(&mut rx)),
        (
            Disposition::Stale,
            "attempt 1 no longer counts: the task was cancelled; it ended cancelled".into()
        )
    );
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Cancelled);
    assert_eq!(h.core.tasks[&t].outcome, None);
    assert_eq!(Counters::get(&h.core.counters.results_recorded), 0);
    // Counted apart from the stale results of lost leases.
    assert_eq!(Counters::get(&h.core.counters.results_cancelled), 1);
    assert_eq!(Counters::get(&h.core.counters.results_stale), 0);
    // The worker is free for the next task.
    let next = h.submit();
    assert!(
        drain(&mut rx)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(a) if a.task_id == next))
    );
}

#[test]
fn a_task_lost_more_than_max_attempts_times_fails_clearly() {
    let mut h = Harness::new();
    let t = h.submit();
    for (i, w) in ["a", "b", "c"].into_iter().enumerate() {
        let (s, _rx) = h.connect(w);
        assert_eq!(h.core.tasks[&t].attempt, Attempt(i as u32 + 1));
        h.lose(w, s, &t);
    }
    let task = &h.core.tasks[&t];
    assert_eq!(task.status, TaskStatus::Failed);
    assert!(
        task.error
            .as_deref()
            .unwrap_or_default()
            .contains("no attempts left")
    );
    assert!(h.core.queue.is_empty());
}

/// A `failed` result of `task`'s `attempt` saying whether its worker could not run it
/// (`worker_fault`: its disk, its process limits).
fn faulty(seq: u64, task: &TaskId, attempt: u32, fault: bool) -> WorkerMsg {
    match result(seq, task, attempt) {
        WorkerMsg::TaskResult(r) => WorkerMsg::TaskResult(TaskResult {
            outcome: Outcome::Failed,
            error: Some(tether_proto::task::TaskError {
                message: "cannot prepare checkpoint dir /x: Permission denied".into(),
                detail: None,
            }),
            worker_fault: fault,
            ..r
        }),
        other => other,
    }
}

/// A `failed` result that says its worker could not run the attempt does not end the task:
/// the task runs again, its attempt used, the result kept with the attempt and not counted.
/// The worker takes no new task for a rest, doubled by each such fault in a row, so that it
/// does not use up the attempts of every queued task in turn. The last attempt's fault fails
/// the task, saying why. A `failed` result without the flag ends its task as before, and
/// clears the row.
#[tokio::test(start_paused = true)]
async fn a_result_of_an_attempt_its_worker_could_not_run_requeues_the_task_and_rests_the_worker() {
    use super::messages::WORKER_FAULT_REST;
    use std::time::Duration;
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    let mut rest = WORKER_FAULT_REST;
    for attempt in 1..=3 {
        assert_eq!(h.core.tasks[&t].attempt, Attempt(attempt));
        drain(&mut rx);
        h.frame("a", s, faulty(u64::from(attempt), &t, attempt, true));
        let msgs = drain(&mut rx);
        assert_eq!(result_ack(&msgs), Disposition::Recorded, "{msgs:?}");
        let task = &h.core.tasks[&t];
        assert_eq!(
            task.attempts[attempt as usize - 1].end.as_deref(),
            Some("worker_fault")
        );
        let w = &h.core.workers[&wid("a")];
        assert_eq!(w.resting.as_ref().map(|r| r.faults), Some(attempt));
        assert_eq!(w.free_slots(), 0, "resting");
        if attempt == 3 {
            break;
        }
        // Queued again, not leased back to the one worker there is while it rests.
        assert_eq!(task.status, TaskStatus::Queued, "{task:?}");
        assert_eq!(task.outcome, None);
        assert!(
            !msgs
                .iter()
                .any(|m| matches!(m, CoordMsg::TaskAssignment(_))),
            "{msgs:?}"
        );
        tokio::time::advance(rest - Duration::from_millis(100)).await;
        sweep(&mut h);
        assert_eq!(h.core.tasks[&t].status, TaskStatus::Queued, "still resting");
        tokio::time::advance(Duration::from_millis(100)).await;
        sweep(&mut h);
        let msgs = drain(&mut rx);
        assert!(
            msgs.iter().any(
                |m| matches!(m, CoordMsg::TaskAssignment(a) if a.attempt == Attempt(attempt + 1))
            ),
            "leased again once the rest ended: {msgs:?}"
        );
        assert!(h.core.workers[&wid("a")].resting.is_none());
        rest *= 2;
    }
    // Each kept with its attempt and counted apart, none counted as the task's.
    assert_eq!(Counters::get(&h.core.counters.results_worker_fault), 3);
    assert_eq!(Counters::get(&h.core.counters.results_recorded), 0);
    let task = &h.core.tasks[&t];
    assert_eq!(task.status, TaskStatus::Failed);
    let error = task.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("no attempts left") && error.contains("Permission denied"),
        "{error}"
    );
    // A replay of the last one is a duplicate, not a second end.
    h.frame("a", s, faulty(3, &t, 3, true));
    assert_eq!(result_ack(&drain(&mut rx)), Disposition::Duplicate);

    tokio::time::advance(rest).await;
    sweep(&mut h);
    let other = h.submit();
    drain(&mut rx);
    h.frame("a", s, faulty(4, &other, 1, false));
    assert_eq!(h.core.tasks[&other].status, TaskStatus::Failed);
    assert_eq!(h.core.tasks[&other].attempts.len(), 1);
    assert_eq!(h.core.workers[&wid("a")].faults_in_row, 0, "it ran a task");
}

/// The task of an attempt its worker could not run goes at once to another worker that can
/// run it, not back to the one resting; a new process of the resting worker takes tasks at
/// once.
#[tokio::test(start_paused = true)]
async fn a_task_its_worker_could_not_run_goes_to_another_worker_at_once() {
    let mut h = Harness::new();
    let (sa, mut rxa) = h.connect("a");
    let (sb, mut rxb) = h.connect("b");
    let t = h.submit();
    let u = h.submit();
    assert_eq!(
        [&t, &u].map(|id| h.core.tasks[id].lease.as_ref().map(|l| l.worker.clone())),
        [Some(wid("a")), Some(wid("b"))]
    );
    // `b` ends `u`: the next dispatch starts after `b`, at `a`, which would take `t` back.
    h.frame("b", sb, result(1, &u, 1));
    drain(&mut rxa);
    drain(&mut rxb);
    h.frame("a", sa, faulty(1, &t, 1, true));
    let task = &h.core.tasks[&t];
    assert_eq!(task.status, TaskStatus::Running);
    assert_eq!(
        task.lease.as_ref().map(|l| l.worker.clone()),
        Some(wid("b"))
    );
    assert!(
        drain(&mut rxb)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(a) if a.attempt == Attempt(2))),
        "assigned to b"
    );
    assert!(h.core.workers[&wid("a")].resting.is_some());
    // A new process of `a` is not the one that could not run it: it takes tasks at once.
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: sa,
    });
    let (_sa2, mut rxa2) = h.connect_registering("a", boot("a-second"));
    drain(&mut rxa2);
    assert!(h.core.workers[&wid("a")].resting.is_none());
    let next = h.submit();
    assert!(
        drain(&mut rxa2)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(a) if a.task_id == next)),
        "the new process took the next task"
    );
}

/// Every assignment names the submission its task came from (`submit_seq`), a number no
/// other task has: a worker tells by it a checkpoint it kept of a removed task of the same id.
#[test]
fn an_assignment_names_its_tasks_submission() {
    let mut h = Harness::new();
    let (_s, mut rx) = h.connect("a");
    let first = h.submit();
    let seqs = |msgs: Vec<CoordMsg>| -> Vec<Option<u64>> {
        msgs.iter()
            .filter_map(|m| match m {
                CoordMsg::TaskAssignment(a) => Some(a.submit_seq),
                _ => None,
            })
            .collect()
    };
    let seq = h.core.tasks[&first].submit_seq;
    assert_eq!(seqs(drain(&mut rx)), vec![Some(seq)]);
    let (_s, mut rx) = h.connect("b");
    let second = h.submit();
    let other = h.core.tasks[&second].submit_seq;
    assert_ne!(other, seq);
    assert_eq!(seqs(drain(&mut rx)), vec![Some(other)]);
}

#[test]
fn the_late_close_of_a_replaced_session_does_not_disconnect_the_new_one() {
    let mut h = Harness::new();
    let (old, mut old_rx) = h.connect("a");
    let (new, _rx) = h.connect("a");
    assert!(matches!(
        old_rx.try_recv(),
        Ok(Outgoing::Msg(_)) | Ok(Outgoing::Close(..))
    ));
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: old,
    });
    let w = &h.core.workers[&wid("a")];
    assert_eq!(w.session.as_ref().map(|s| s.id), Some(new));
    assert_eq!(w.state, crate::model::WorkerState::Connected);
}

#[test]
fn a_session_whose_registration_is_refused_does_not_keep_a_lost_worker_s_leases() {
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.lost_after = std::time::Duration::ZERO;
    let mut h = Harness::with(cfg);
    let (s, _rx) = h.connect("a");
    let t = h.submit();
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: s,
    });
    // Back on the socket, but with a registration the core refuses.
    let _rx2 = h.connect_refused("a", 99);
    let mut b = Batch::default();
    h.core.sweep(&mut b);
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Queued);
    assert!(h.core.tasks[&t].lease.is_none());
}

/// A registration the core refuses does not touch the worker: its live session is not replaced
/// (no 4009), nor counted as replaced, nor is the worker's record changed.
#[test]
fn a_refused_registration_does_not_replace_the_workers_live_session() {
    let mut h = Harness::new();
    let (live, mut live_rx) = h.connect("a");
    drain(&mut live_rx);
    let mut refused = h.connect_refused("a", 99);
    assert_eq!(close_code(&mut refused), Some(4002));
    assert_eq!(close_code(&mut live_rx), None, "the live session stays");
    let w = &h.core.workers[&wid("a")];
    assert_eq!(
        (w.session.as_ref().map(|s| s.id), w.state, w.sessions),
        (Some(live), WorkerState::Connected, 1)
    );
    let replaced = &h.core.counters.sessions_replaced;
    assert_eq!(replaced.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// Two live processes under one worker id: the newer keeps it, and the process it replaced is
/// refused (4003) when it comes back, instead of the two replacing each other for ever. A
/// process that reconnects (the same boot) is never refused, nor is the first registration of
/// a new one.
#[test]
fn a_process_a_newer_one_of_its_worker_replaced_is_refused_when_it_comes_back() {
    let mut h = Harness::new();
    let (_, mut first_rx) = h.connect_registering("a", boot("b-first"));
    drain(&mut first_rx);
    // A reconnect of the same process replaces its own session.
    let (_, mut again_rx) = h.connect_registering("a", boot("b-first"));
    assert_eq!(close_code(&mut first_rx), Some(4009));
    let (newer, mut newer_rx) = h.connect_registering("a", boot("b-second"));
    assert_eq!(close_code(&mut again_rx), Some(4009));
    drain(&mut newer_rx);
    let (_, mut back_rx) = h.connect_registering("a", boot("b-first"));
    let conflicts = &h.core.counters.id_conflicts;
    assert_eq!(conflicts.load(std::sync::atomic::Ordering::Relaxed), 1);
    let closed = close(&mut back_rx).expect("refused");
    assert_eq!(closed.0, 4003);
    assert!(closed.1.contains("b-second"), "{}", closed.1);
    assert!(closed.1.len() <= 123, "a close reason's limit");
    assert_eq!(
        close_code(&mut newer_rx),
        None,
        "the newer process keeps its session"
    );
    let w = &h.core.workers[&wid("a")];
    assert_eq!(
        (w.session.as_ref().map(|s| s.id), w.boot_id.as_str()),
        (Some(newer), "b-second")
    );
    let replaced = &h.core.counters.sessions_replaced;
    assert_eq!(replaced.load(std::sync::atomic::Ordering::Relaxed), 2);
    // Once the newer one stopped gracefully, it gave the id up: the older may have it back.
    h.frame("a", newer, WorkerMsg::WorkerStopping(stop_notice()));
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: newer,
    });
    assert_eq!(h.core.workers[&wid("a")].state, WorkerState::Stopped);
    let (back, mut back_rx) = h.connect_registering("a", boot("b-first"));
    assert_eq!(close_code(&mut back_rx), None, "taken back");
    assert_eq!(
        h.core.workers[&wid("a")].session.as_ref().map(|s| s.id),
        Some(back)
    );
}

/// A replaced process that keeps coming back is refused every time (4003, counted each
/// time), and each attempt is noted under one kind in the refusal log's limiter
/// (`ratelimit`), so it is said at WARN once a window, its repeats at debug: a stale process
/// of a fleet retries without end, and each attempt was a WARN line.
#[test]
fn a_replaced_process_coming_back_again_and_again_is_said_once_at_warn() {
    // An id of its own: the limiter is process-wide.
    let id = "a-replaced-again";
    let mut h = Harness::new();
    let (_, mut first_rx) = h.connect_registering(id, boot("b-first"));
    drain(&mut first_rx);
    let (_, mut newer_rx) = h.connect_registering(id, boot("b-second"));
    drain(&mut newer_rx);
    const BACK: u64 = 5;
    for _ in 0..BACK {
        let (_, mut back_rx) = h.connect_registering(id, boot("b-first"));
        assert_eq!(close(&mut back_rx).map(|c| c.0), Some(4003));
    }
    let conflicts = &h.core.counters.id_conflicts;
    assert_eq!(conflicts.load(std::sync::atomic::Ordering::Relaxed), BACK);
    // The first was the window's WARN, the other BACK - 1 its repeats: the next is one more.
    let next = h.core.refusals.note(id, super::messages::REPLACED_AGAIN);
    assert_eq!(
        next,
        crate::ratelimit::Verdict {
            warn: false,
            repeats: BACK
        }
    );
}

/// The refusal holds only while the newer process holds a live session: once it is gone
/// (crashed, or a client that registered under the id once and left), the older process,
/// alive, takes the id back, and is then no replaced process itself (a reconnect of it that
/// replaces its own half-open session is never refused). The one it replaced is, while the
/// older one is connected.
#[test]
fn a_replaced_process_takes_its_id_back_once_the_newer_one_is_gone() {
    let mut h = Harness::new();
    let (_, mut old_rx) = h.connect_registering("a", boot("b-old"));
    drain(&mut old_rx);
    let (impostor, mut imp_rx) = h.connect_registering("a", boot("b-brief"));
    drain(&mut imp_rx);
    let (_, mut refused_rx) = h.connect_registering("a", boot("b-old"));
    assert_eq!(
        close_code(&mut refused_rx),
        Some(4003),
        "while it is connected"
    );
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: impostor,
    });
    let (back, mut back_rx) = h.connect_registering("a", boot("b-old"));
    assert_eq!(close_code(&mut back_rx), None, "the newer one is gone");
    let (again, mut again_rx) = h.connect_registering("a", boot("b-old"));
    assert_eq!(
        close_code(&mut back_rx),
        Some(4009),
        "its own session replaced"
    );
    assert_eq!(close_code(&mut again_rx), None, "not refused: {back}");
    let (_, mut brief_rx) = h.connect_registering("a", boot("b-brief"));
    assert_eq!(close_code(&mut brief_rx), Some(4003), "the one it replaced");
    let w = &h.core.workers[&wid("a")];
    assert_eq!(
        (w.session.as_ref().map(|s| s.id), w.boot_id.as_str()),
        (Some(again), "b-old")
    );
}

/// A boot id is the worker's own random id, and the coordinator's logs name it: one with a
/// control character (a newline that would forge a log line) is refused (4002, `bad_frame`
/// saying why) before the core takes the worker, and the reason shows the character escaped.
#[test]
fn a_registration_whose_boot_id_holds_a_newline_is_refused_saying_why() {
    let mut h = Harness::new();
    let (_, mut rx) = h.connect_registering("a", |r| {
        r.boot_id = "b-1\nINFO worker registered".into();
    });
    let sent: Vec<Outgoing> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    let error = sent.iter().find_map(|o| match o {
        Outgoing::Msg(m) => match &**m {
            CoordMsg::Error(e) => Some(e.clone()),
            _ => None,
        },
        _ => None,
    });
    let error = error.expect("an error saying why");
    assert_eq!(error.code, tether_proto::msg::ErrorCode::BadFrame);
    assert!(
        error
            .message
            .contains("boot_id with a control character ('\\n' at byte 3)"),
        "{}",
        error.message
    );
    let close = sent.iter().find_map(|o| match o {
        Outgoing::Close(c) => Some(c.0),
        _ => None,
    });
    assert_eq!(close, Some(4002));
    assert!(h.core.workers.is_empty(), "the core never took it");
}

/// The refusal of a replaced process names the newer one's boot id, and the reason is logged:
/// a boot id that holds a newline (kept in a store from before such ids were refused) shows
/// there escaped, so it cannot forge a log line.
#[test]
fn a_refusal_naming_a_boot_id_shows_it_escaped() {
    let mut h = Harness::new();
    let (_, mut first_rx) = h.connect_registering("a", boot("b-first"));
    drain(&mut first_rx);
    let (_, mut newer_rx) = h.connect_registering("a", boot("b-second"));
    drain(&mut newer_rx);
    let w = h.core.workers.get_mut(&wid("a")).expect("worker");
    w.boot_id = "b-2\nERROR forged".into();
    let (_, mut back_rx) = h.connect_registering("a", boot("b-first"));
    let closed = close(&mut back_rx).expect("refused");
    assert_eq!(closed.0, 4003);
    assert!(
        closed.1.contains(r"(boot b-2\nERROR forged)"),
        "{}",
        closed.1
    );
    assert!(!closed.1.chars().any(char::is_control), "{:?}", closed.1);
}

#[test]
fn a_connection_whose_registration_is_refused_leaves_no_worker_record_and_saves_none() {
    let mut h = Harness::new();
    let mut rx = h.connect_refused("stranger", 7);
    assert_eq!(close_code(&mut rx), Some(4002), "refused for its protocol");
    assert!(
        h.core.workers.is_empty(),
        "no record for a refused connection"
    );
    let mut b = Batch::default();
    h.core.apply(
        Event::Disconnected {
            worker: wid("stranger"),
            session_id: 7,
        },
        &mut b,
    );
    assert!(h.core.workers.is_empty(), "no record once it ended");
    assert!(
        !b.muts
            .iter()
            .any(|m| matches!(m, crate::store::Mutation::PutWorker(_))),
        "nothing saved"
    );
    let mut b = Batch::default();
    h.core.sweep(&mut b);
    assert!(b.muts.is_empty() && h.core.workers.is_empty());

    // A registered worker that disconnects is kept and saved, as before.
    let (s, _rx) = h.connect("a");
    let mut b = Batch::default();
    h.core.apply(
        Event::Disconnected {
            worker: wid("a"),
            session_id: s,
        },
        &mut b,
    );
    assert_eq!(h.core.workers[&wid("a")].state, WorkerState::Disconnected);
    assert!(
        b.muts
            .iter()
            .any(|m| matches!(m, crate::store::Mutation::PutWorker(w) if w.worker_id == wid("a")))
    );
    // A later connection of that worker that does not register leaves its record as it was.
    let _rx = h.connect_refused("a", 99);
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: 99,
    });
    let w = &h.core.workers[&wid("a")];
    assert_eq!(
        (w.state, w.boot_id.as_str()),
        (WorkerState::Disconnected, "b")
    );
}

/// Runs the sweep as the core's loop does, with the dispatch it calls for and its effects.
fn sweep(h: &mut Harness) {
    let mut b = Batch::default();
    h.core.sweep(&mut b);
    if h.core.dispatch_needed {
        h.core.dispatch_needed = false;
        h.core.dispatch(&mut b);
    }
    for e in b.effects {
        e.run(&h.conn);
    }
}

#[tokio::test(start_paused = true)]
async fn a_worker_is_lost_a_grace_period_after_its_last_session_ended_not_its_first() {
    use std::time::Duration;
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.lost_after = Duration::from_secs(10);
    let mut h = Harness::with(cfg);
    let (s1, _rx1) = h.connect("a");
    let t = h.submit();
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Running);
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: s1,
    });
    tokio::time::advance(Duration::from_secs(6)).await;
    let (s2, _rx2) = h.connect("a");
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: s2,
    });
    // The first session ended 11 s ago, the last 5 s ago.
    tokio::time::advance(Duration::from_secs(5)).await;
    sweep(&mut h);
    assert_eq!(
        h.core.tasks[&t].status,
        TaskStatus::Running,
        "still within its grace"
    );
    assert_eq!(h.core.workers[&wid("a")].state, WorkerState::Disconnected);
    tokio::time::advance(Duration::from_secs(5)).await;
    sweep(&mut h);
    assert_eq!(h.core.workers[&wid("a")].state, WorkerState::Lost);
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Queued, "requeued");
}

/// A core whose workers are lost 10 s after they go, with worker `a` connected and running a
/// task of a 1 s timeout: the core, `a`'s session and mailbox, and the task.
fn running_a_timed_task() -> (Harness, u64, super::mailbox::Receiver<Outgoing>, TaskId) {
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.lost_after = std::time::Duration::from_secs(10);
    let mut h = Harness::with(cfg);
    let (s, rx) = h.connect("a");
    let mut spec = TaskSpec::new("sleep", serde_json::json!({}));
    spec.timeout_ms = Some(1_000);
    let t = h.submit_spec(spec);
    (h, s, rx, t)
}

#[tokio::test(start_paused = true)]
async fn a_task_far_past_its_timeout_is_timed_out_by_the_sweep() {
    use std::time::Duration;
    let (mut h, s, mut rx, timed) = running_a_timed_task();
    assert_eq!(h.core.tasks[&timed].status, TaskStatus::Running);
    // Its timeout and the grace period, less a moment: the worker may still report.
    tokio::time::advance(Duration::from_millis(10_900)).await;
    sweep(&mut h);
    assert_eq!(h.core.tasks[&timed].status, TaskStatus::Running);
    tokio::time::advance(Duration::from_millis(200)).await;
    sweep(&mut h);
    assert_eq!(h.core.tasks[&timed].status, TaskStatus::TimedOut);
    // The worker's result after the backstop's `cancel_task`: kept, not counted, and counted
    // apart from the stale results of lost leases, as after a user's cancel.
    h.frame("a", s, result(1, &timed, 1));
    let (disposition, why) = result_ack_why(&drain(&mut rx));
    assert_eq!(disposition, Disposition::Stale);
    assert!(
        why.contains("the task ran past its timeout and the coordinator ended it"),
        "{why}"
    );
    assert_eq!(h.core.tasks[&timed].status, TaskStatus::TimedOut);
    assert_eq!(Counters::get(&h.core.counters.results_cancelled), 1);
    assert_eq!(Counters::get(&h.core.counters.results_stale), 0);
}

/// A coordinator restarted while a task runs counts the backstop from the lease's start in
/// the run before, not from its own start: restarts more often than a timeout would put the
/// backstop off for ever.
#[tokio::test(start_paused = true)]
async fn the_timeout_backstop_counts_from_the_lease_not_from_the_restart() {
    use std::time::Duration;
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.lost_after = Duration::from_secs(10);
    let mut h = Harness::with(cfg.clone());
    let (_s, _rx) = h.connect_registering("a", |r| r.slots = 2);
    let mut spec = TaskSpec::new("sleep", serde_json::json!({}));
    spec.timeout_ms = Some(1_000);
    let timed = h.submit_spec(spec);
    let waiting = h.submit();
    // What the store held: the lease began 8 s ago; the other task began one 30 s ago.
    let mut loaded = Loaded::default();
    for (id, ago) in [(&timed, 8), (&waiting, 30)] {
        let mut t = h.core.tasks[id].clone();
        t.lease.as_mut().expect("leased").since = now() - chrono::Duration::seconds(ago);
        loaded.tasks.push(t);
    }
    let mut w = crate::model::Worker::new(wid("a"), now());
    w.state = WorkerState::Disconnected;
    loaded.workers.push(w);
    let mut h = Harness::from_store(cfg, loaded);
    // Its timeout and the grace period (11 s) less 8 s, less a moment: it may still report.
    tokio::time::advance(Duration::from_millis(2_900)).await;
    sweep(&mut h);
    assert_eq!(h.core.tasks[&timed].status, TaskStatus::Running);
    tokio::time::advance(Duration::from_millis(200)).await;
    sweep(&mut h);
    assert_eq!(h.core.tasks[&timed].status, TaskStatus::TimedOut);
    // Without a timeout there is no backstop, however old the lease.
    assert_eq!(h.core.tasks[&waiting].status, TaskStatus::Running);
}

/// An assignment sent again at the worker's return starts the worker's clock for the task then,
/// so the coordinator's backstop counts from the resend: counted from the lease, it ended the
/// task as overdue while the worker's own deadline was still ahead (and stored a result that
/// came just before that deadline as stale).
#[tokio::test(start_paused = true)]
async fn a_resent_assignment_is_not_timed_out_before_the_workers_own_deadline() {
    use std::time::Duration;
    let (mut h, s, mut rx, t) = running_a_timed_task();
    drain(&mut rx);
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: s,
    });
    // Back within the grace period, without the task: the assignment is sent again.
    tokio::time::advance(Duration::from_millis(9_500)).await;
    let (_s2, mut rx2) = h.connect("a");
    assert!(
        drain(&mut rx2)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(a) if a.task_id == t))
    );
    // The lease's timeout and grace (11 s) have passed, the resend's have not.
    tokio::time::advance(Duration::from_millis(2_000)).await;
    sweep(&mut h);
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Running);
    // And they do pass from the resend.
    tokio::time::advance(Duration::from_millis(9_100)).await;
    sweep(&mut h);
    assert_eq!(h.core.tasks[&t].status, TaskStatus::TimedOut);
}

#[test]
fn an_assignment_the_worker_never_received_is_sent_again_after_the_registration_ack() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    drain(&mut rx);
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: s,
    });
    // The worker comes back without mentioning the task: the assignment was lost in flight.
    let (_s2, mut rx2) = h.connect("a");
    let msgs = drain(&mut rx2);
    let types: Vec<&str> = msgs.iter().map(CoordMsg::type_name).collect();
    assert_eq!(types, ["registration_ack", "task_assignment"], "ack first");
    assert!(
        matches!(&msgs[1], CoordMsg::TaskAssignment(a) if a.task_id == t && a.attempt == Attempt(1))
    );
    assert_eq!(
        h.core.tasks[&t].attempt,
        Attempt(1),
        "the same attempt, not a new one"
    );
}

/// A new process of the worker (another boot id, no state directory to report what died
/// with the old one) that does not mention its lease: the attempt ran, if at all, in the
/// process that is gone. It ends lost and the next attempt has its own number, so the history
/// shows the restart and the two processes never run one attempt.
#[test]
fn a_lease_a_new_process_of_the_worker_does_not_know_ends_lost_and_the_next_attempt_is_new() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect_registering("a", boot("b-old"));
    let t = h.submit();
    drain(&mut rx);
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: s,
    });
    let (_s2, mut rx2) = h.connect_registering("a", boot("b-new"));
    let msgs = drain(&mut rx2);
    assert!(
        matches!(&msgs[1], CoordMsg::TaskAssignment(a) if a.task_id == t && a.attempt == Attempt(2)),
        "{msgs:?}"
    );
    let task = &h.core.tasks[&t];
    let ends: Vec<(Attempt, Option<&str>)> = task
        .attempts
        .iter()
        .map(|a| (a.attempt, a.end.as_deref()))
        .collect();
    assert_eq!(ends, [(Attempt(1), Some("lost")), (Attempt(2), None)]);
}

#[test]
fn what_was_answered_to_an_ended_session_is_never_replayed_to_the_next() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    let t2 = h.submit_spec(TaskSpec::new("sleep", serde_json::json!({})));
    drain(&mut rx);
    // The result's ack and the next assignment go to the first session, which ends before
    // the worker could read them (the original queued such messages and replayed them).
    h.frame("a", s, result(1, &t, 1));
    assert_eq!(result_ack(&drain(&mut rx)), Disposition::Recorded);
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: s,
    });
    let (s2, mut rx2) = h.connect("a");
    let msgs = drain(&mut rx2);
    let types: Vec<&str> = msgs.iter().map(CoordMsg::type_name).collect();
    // Only what holds now: the registration's ack and the lease still held (t2, sent again).
    assert_eq!(types, ["registration_ack", "task_assignment"], "{msgs:?}");
    assert!(matches!(&msgs[1], CoordMsg::TaskAssignment(a) if a.task_id == t2));
    // The worker, not having seen the ack, sends its result again: acknowledged afresh, once.
    h.frame("a", s2, result(1, &t, 1));
    assert_eq!(result_ack(&drain(&mut rx2)), Disposition::Duplicate);
    assert_eq!(Counters::get(&h.core.counters.results_recorded), 1);
}

#[test]
fn retention_removes_only_tasks_that_finished_before_the_cutoff() {
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.retention = Some(std::time::Duration::from_secs(3600));
    let mut h = Harness::with(cfg);
    let (s, mut rx) = h.connect("a");
    let done = h.submit();
    drain(&mut rx);
    h.frame("a", s, result(1, &done, 1));
    drain(&mut rx);
    let queued = h.submit();
    let running = h.core.tasks[&queued].status;
    assert_eq!(h.core.tasks[&done].status, TaskStatus::Completed);

    // The sweep with a one-hour retention keeps a task that finished just now.
    let mut b = Batch::default();
    h.core.sweep(&mut b);
    assert!(h.core.tasks.contains_key(&done));
    assert!(
        !b.muts
            .iter()
            .any(|m| matches!(m, crate::store::Mutation::DeleteTask { .. }))
    );

    // A cutoff after it finished removes it, from the model and (by mutation) from the store.
    let mut b = Batch::default();
    h.core
        .expire_finished_before(now() + chrono::Duration::seconds(1), &mut b);
    assert!(
        !h.core.tasks.contains_key(&done),
        "the finished task is gone"
    );
    let deleted: Vec<&TaskId> = b
        .muts
        .iter()
        .filter_map(|m| match m {
            crate::store::Mutation::DeleteTask { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, [&done]);
    // The next submission number is kept: the removed task may have held the highest.
    assert!(
        b.muts.iter().any(|m| matches!(
            m,
            crate::store::Mutation::NextSubmitSeq(n) if *n == h.core.next_submit_seq
        )),
        "{:?}",
        b.muts
    );
    assert_eq!(Counters::get(&h.core.counters.tasks_expired), 1);
    // An unfinished task is never removed, however old.
    assert_eq!(h.core.tasks[&queued].status, running);
    let mut b = Batch::default();
    h.core
        .expire_finished_before(now() + chrono::Duration::days(365), &mut b);
    assert!(h.core.tasks.contains_key(&queued));
    assert!(b.muts.is_empty());
}

#[test]
fn a_task_submitted_under_a_removed_tasks_id_numbers_its_attempts_after_it() {
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.retention = Some(std::time::Duration::from_secs(3600));
    let mut h = Harness::with(cfg);
    let (s, mut rx) = h.connect("a");
    let spec = TaskSpec {
        task_id: Some(TaskId::parse("nightly").expect("id")),
        max_attempts: Some(1),
        ..TaskSpec::new("sleep", serde_json::json!({}))
    };
    let t = h.submit_spec(spec.clone());
    drain(&mut rx);
    h.frame("a", s, result(1, &t, 1));
    drain(&mut rx);
    h.core
        .expire_finished_before(now() + chrono::Duration::seconds(1), &mut Batch::default());
    assert!(!h.core.tasks.contains_key(&t), "removed by retention");

    // The same worker, free, takes the new task of that id: as attempt 2, not as the attempt 1
    // it remembers finishing (a worker ignores an assignment of an attempt it finished).
    assert_eq!(h.submit_spec(spec), t);
    let msgs = drain(&mut rx);
    let attempt = msgs.iter().find_map(|m| match m {
        CoordMsg::TaskAssignment(a) if a.task_id == t => Some((a.attempt, a.attempt_base)),
        _ => None,
    });
    // With the base, for the worker to tell a checkpoint it kept of the removed task from one
    // of this task's.
    assert_eq!(attempt, Some((Attempt(2), Some(Attempt(1)))), "{msgs:?}");
    assert_eq!(h.core.tasks[&t].attempt_base, Attempt(1));

    // The old attempt's result, sent again (its acknowledgement was lost), does not count for
    // the new task.
    h.frame("a", s, result(2, &t, 1));
    assert_ne!(result_ack(&drain(&mut rx)), Disposition::Recorded);
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Running);
    assert_eq!(Counters::get(&h.core.counters.results_recorded), 1);

    // Its `max_attempts` counts its own attempts: one lost, it has none left.
    h.lose("a", s, &t);
    let t = &h.core.tasks[&t];
    assert_eq!(t.status, TaskStatus::Failed);
    assert!(
        t.error.as_deref().is_some_and(|e| e.ends_with("(1 of 1)")),
        "{:?}",
        t.error
    );
}

#[test]
fn the_removed_ids_loaded_at_start_number_the_attempts_of_their_new_tasks() {
    let loaded = Loaded {
        removed: vec![("nightly".to_owned(), Attempt(4), now())],
        ..Loaded::default()
    };
    let mut h = Harness::from_store(CoordinatorConfig::new("/nonexistent"), loaded);
    let (_s, mut rx) = h.connect("a");
    let t = h.submit_spec(TaskSpec {
        task_id: Some(TaskId::parse("nightly").expect("id")),
        ..TaskSpec::new("sleep", serde_json::json!({}))
    });
    assert!(drain(&mut rx).iter().any(
        |m| matches!(m, CoordMsg::TaskAssignment(a) if a.task_id == t && a.attempt == Attempt(5))
    ));
    // Another id starts at 1.
    let (_s, mut rx) = h.connect("b");
    let other = h.submit();
    assert!(drain(&mut rx).iter().any(
        |m| matches!(m, CoordMsg::TaskAssignment(a) if a.task_id == other && a.attempt == Attempt(1) && a.attempt_base.is_none())
    ));
}

/// An id removed longer than the retention ago is forgotten by the sweep, in the model and
/// (by mutation) in the store: a task of it numbers its attempts from 1 again. One removed
/// since is kept. Kept for ever, the ids grew with every task ever removed.
#[test]
fn the_sweep_forgets_ids_removed_longer_than_the_retention_ago() {
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.retention = Some(std::time::Duration::from_secs(3600));
    let ago = |mins: i64| now() - chrono::Duration::minutes(mins);
    let loaded = Loaded {
        removed: vec![
            ("old".to_owned(), Attempt(4), ago(120)),
            ("recent".to_owned(), Attempt(4), ago(10)),
        ],
        ..Loaded::default()
    };
    let mut h = Harness::from_store(cfg, loaded);
    let forgets = |b: &Batch| {
        b.muts
            .iter()
            .filter(|m| matches!(m, crate::store::Mutation::ForgetRemoved { .. }))
            .count()
    };
    let mut b = Batch::default();
    h.core.sweep(&mut b);
    assert_eq!(forgets(&b), 1, "{:?}", b.muts);
    let mut b = Batch::default();
    h.core.sweep(&mut b);
    assert_eq!(forgets(&b), 0, "nothing more to forget");
    let (_s, mut rx) = h.connect_registering("a", |r| r.slots = 2);
    for (id, first) in [("old", Attempt(1)), ("recent", Attempt(5))] {
        let t = h.submit_spec(TaskSpec {
            task_id: Some(TaskId::parse(id).expect("id")),
            ..TaskSpec::new("sleep", serde_json::json!({}))
        });
        assert!(
            drain(&mut rx).iter().any(
                |m| matches!(m, CoordMsg::TaskAssignment(a) if a.task_id == t && a.attempt == first)
            ),
            "{id}: attempt {first:?}"
        );
    }
}

#[test]
fn submission_numbers_continue_past_the_kept_mark_when_the_stored_tasks_end_below_it() {
    let loaded = Loaded {
        next_submit_seq: 41,
        ..Loaded::default()
    };
    let mut h = Harness::from_store(CoordinatorConfig::new("/nonexistent"), loaded);
    let t = h.submit();
    assert_eq!(h.core.tasks[&t].submit_seq, 41);
}

/// Every page of `q`, each asked with the previous page's last `submit_seq`.
fn pages(h: &Harness, mut q: super::TaskQuery) -> Vec<Vec<TaskId>> {
    let mut out = Vec::new();
    for _ in 0..100 {
        let page = h.core.list_tasks(&q);
        let Some(last) = page.last() else {
            return out;
        };
        q.after_seq = Some(last.submit_seq);
        let short = page.len() < q.limit;
        out.push(page.into_iter().map(|t| t.task_id).collect());
        if short {
            return out;
        }
    }
    panic!("no last page after 100: {out:?}");
}

#[test]
fn a_listing_read_page_by_page_returns_every_task_once_in_order_even_past_a_removed_cursor() {
    let mut h = Harness::new();
    let ids: Vec<TaskId> = (0..23).map(|_| h.submit()).collect();
    let q = |limit, newest_first| super::TaskQuery {
        limit,
        newest_first,
        ..Default::default()
    };

    let oldest = pages(&h, q(5, false));
    assert_eq!(
        oldest.iter().map(Vec::len).collect::<Vec<_>>(),
        [5, 5, 5, 5, 3]
    );
    assert_eq!(oldest.concat(), ids);
    let newest = pages(&h, q(5, true));
    let mut reversed = ids.clone();
    reversed.reverse();
    assert_eq!(newest.concat(), reversed);
    // One page of all of them, and nothing for a limit of 0.
    assert_eq!(pages(&h, q(100, false)), vec![ids.clone()]);
    assert!(h.core.list_tasks(&q(0, false)).is_empty());

    // The cursor is a position, not a task: it still holds once its task is gone (retention),
    // and a task submitted meanwhile comes on a later page, not a second time.
    let first = h.core.list_tasks(&q(5, false));
    let cursor = first.last().expect("a page").submit_seq;
    let gone = h.core.tasks.remove(&ids[4]).expect("a task");
    h.core.listing.remove(&gone);
    let late = h.submit();
    let rest = h.core.list_tasks(&super::TaskQuery {
        after_seq: Some(cursor),
        ..q(100, false)
    });
    let mut expected = ids[5..].to_vec();
    expected.push(late);
    assert_eq!(
        rest.into_iter().map(|t| t.task_id).collect::<Vec<_>>(),
        expected
    );

    // With a status filter, only the matching tasks, still in pages.
    let cancelled: Vec<TaskId> = [&ids[1], &ids[9], &ids[17]]
        .into_iter()
        .map(|id| {
            let (tx, mut rx) = tokio::sync::oneshot::channel();
            h.step(Event::Api(Api::Control {
                task: id.clone(),
                op: super::ControlOp::Cancel,
                reply: tx,
            }));
            rx.try_recv().expect("reply").expect("cancelled").task_id
        })
        .collect();
    let only = pages(
        &h,
        super::TaskQuery {
            status: Some(TaskStatus::Cancelled),
            ..q(2, false)
        },
    );
    assert_eq!(only.concat(), cancelled);
}

fn checkpoint(seq: u64, task: &TaskId, id: &str, size: u64, chunks: u32) -> WorkerMsg {
    WorkerMsg::Checkpoint(tether_proto::msg::Checkpoint {
        seq: Seq(seq),
        task_id: task.clone(),
        attempt: Attempt(1),
        checkpoint_id: tether_proto::CheckpointId::parse(id).expect("id"),
        size,
        chunks,
        timestamp: now(),
    })
}

fn piece(seq: u64, task: &TaskId, id: &str, chunk: u32, data: &[u8]) -> WorkerMsg {
    WorkerMsg::CheckpointData(tether_proto::msg::CheckpointData {
        seq: Seq(seq),
        task_id: task.clone(),
        attempt: Attempt(1),
        checkpoint_id: tether_proto::CheckpointId::parse(id).expect("id"),
        chunk,
        data: tether_proto::task::Blob(data.to_vec()),
        timestamp: now(),
    })
}

/// `msg` (a checkpoint or one of its pieces) as attempt `attempt` sends it.
fn of_attempt(mut msg: WorkerMsg, attempt: u32) -> WorkerMsg {
    match &mut msg {
        WorkerMsg::Checkpoint(c) => c.attempt = Attempt(attempt),
        WorkerMsg::CheckpointData(d) => d.attempt = Attempt(attempt),
        _ => unreachable!("not a checkpoint message"),
    }
    msg
}

fn checkpoint_ack(msgs: &[CoordMsg]) -> Disposition {
    ack_of(msgs, "checkpoint_ack")
}

fn deleted_checkpoints(muts: &[crate::store::Mutation]) -> Vec<&str> {
    muts.iter()
        .filter_map(|m| match m {
            crate::store::Mutation::DeleteCheckpoint(id) => Some(id.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn an_ended_attempts_unfinished_checkpoint_is_dropped_and_its_late_pieces_never_become_the_latest()
{
    let mut h = Harness::new();
    let (sa, mut rxa) = h.connect("a");
    let t = h.submit();
    // Attempt 1 uploads half of c-old, then its worker is taken for lost.
    h.frame("a", sa, checkpoint(1, &t, "c-old", 2, 2));
    h.frame("a", sa, piece(2, &t, "c-old", 0, b"a"));
    drain(&mut rxa);
    let b = h.lose("a", sa, &t);
    assert!(h.core.partial.is_empty(), "no lease can complete it");
    assert_eq!(
        deleted_checkpoints(&b.muts),
        ["c-old"],
        "nor does the store keep it"
    );
    // Attempt 2 checkpoints on b.
    let (sb, mut rxb) = h.connect("b");
    h.frame("b", sb, of_attempt(checkpoint(1, &t, "c-new", 1, 1), 2));
    h.frame("b", sb, of_attempt(piece(2, &t, "c-new", 0, b"b"), 2));
    assert_eq!(data_ack(&drain(&mut rxb)), Disposition::Recorded);
    // a comes back and replays its outbox: the rest of c-old is stale, not a checkpoint.
    let (sa2, mut rxa2) = h.connect("a");
    drain(&mut rxa2);
    h.frame("a", sa2, checkpoint(3, &t, "c-old", 2, 2));
    assert_eq!(checkpoint_ack(&drain(&mut rxa2)), Disposition::Stale);
    h.frame("a", sa2, piece(4, &t, "c-old", 1, b"a"));
    let msgs = drain(&mut rxa2);
    assert_eq!(data_ack(&msgs), Disposition::Stale);
    let why = msgs.iter().find_map(|m| m.message_ack()?.reason.clone());
    assert!(
        why.as_deref()
            .is_some_and(|w| w.ends_with("; it runs as attempt 2 on worker b")),
        "{why:?}"
    );
    let latest = h.core.tasks[&t].latest_checkpoint.clone().expect("latest");
    assert_eq!(latest.checkpoint_id.as_str(), "c-new");

    // Even an upload still known (one a previous run left) takes no piece from an ended
    // attempt.
    h.core.partial.insert(super::Partial {
        meta: crate::model::CheckpointMeta {
            checkpoint_id: tether_proto::CheckpointId::parse("c-old").expect("id"),
            task_id: t.clone(),
            attempt: Attempt(1),
            worker: wid("a"),
            size: 2,
            chunks: 2,
            created_at: now(),
        },
        received: [0].into(),
        bytes: 1,
    });
    h.frame("a", sa2, piece(5, &t, "c-old", 1, b"a"));
    assert_eq!(data_ack(&drain(&mut rxa2)), Disposition::Stale);
    let latest = h.core.tasks[&t].latest_checkpoint.clone().expect("latest");
    assert_eq!(latest.checkpoint_id.as_str(), "c-new");
    // At start, such leftovers go.
    let mut b = Batch::default();
    h.core.drop_unleased_partials(&mut b);
    assert_eq!(deleted_checkpoints(&b.muts), ["c-old"]);
    assert!(h.core.partial.is_empty());
}

/// An attempt's last checkpoint and its result, replayed by its worker in a new session: with
/// the pieces first, the checkpoint completes and stays the finished task's latest; with the
/// result first (the Rust worker's outbox sends results first), the result ends the lease and
/// the pieces after it are `stale`, not stored: that checkpoint is lost. By design (section 11
/// of docs/PROTOCOL.md): a late piece never completes an ended attempt's upload, every result
/// ends its task for good, so nothing resumes from that checkpoint, and the result is not
/// held back by its upload.
#[test]
fn an_attempts_last_checkpoint_is_kept_only_if_it_arrives_before_its_result() {
    let mut h = Harness::new();
    for (order, kept) in [("checkpoint first", true), ("result first", false)] {
        let (s, mut rx) = h.connect("a");
        let t = h.submit();
        assert_eq!(h.core.tasks[&t].status, TaskStatus::Running, "{order}");
        drain(&mut rx);
        // The session is lost with the upload announced, unacknowledged pieces and the result
        // in the outbox; the worker comes back and replays them.
        h.frame("a", s, checkpoint(1, &t, "c-last", 2, 2));
        h.step(Event::Disconnected {
            worker: wid("a"),
            session_id: s,
        });
        let (s2, mut rx2) = h.connect_registering("a", |r| {
            r.inventory.finished = vec![tether_proto::task::TaskRef::new(t.clone(), Attempt(1))];
        });
        drain(&mut rx2);
        let pieces = [
            piece(2, &t, "c-last", 0, b"a"),
            piece(3, &t, "c-last", 1, b"b"),
        ];
        if kept {
            for p in pieces.clone() {
                h.frame("a", s2, p);
            }
        }
        h.frame("a", s2, result(4, &t, 1));
        assert_eq!(
            result_ack(&drain(&mut rx2)),
            Disposition::Recorded,
            "{order}"
        );
        if !kept {
            for p in pieces {
                h.frame("a", s2, p);
                assert_eq!(data_ack(&drain(&mut rx2)), Disposition::Stale, "{order}");
            }
        }
        assert_eq!(h.core.tasks[&t].status, TaskStatus::Completed, "{order}");
        let latest = h.core.tasks[&t].latest_checkpoint.clone();
        assert_eq!(
            latest.map(|c| c.checkpoint_id.to_string()),
            kept.then(|| "c-last".to_owned()),
            "{order}"
        );
        h.step(Event::Disconnected {
            worker: wid("a"),
            session_id: s2,
        });
    }
}

#[test]
fn abandoned_uploads_do_not_count_against_the_next_attempts_checkpoints() {
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.max_checkpoint_bytes = 100;
    let mut h = Harness::with(cfg);
    let t = h.submit();
    // Two attempts each leave 100 announced bytes behind: the per-task bound (2 x 100).
    for (attempt, w) in [(1, "a"), (2, "b")] {
        let (s, mut rx) = h.connect(w);
        let id = format!("c-{w}");
        h.frame(w, s, of_attempt(checkpoint(1, &t, &id, 100, 1), attempt));
        assert_eq!(checkpoint_ack(&drain(&mut rx)), Disposition::Recorded);
        h.lose(w, s, &t);
    }
    let (s, mut rx) = h.connect("c");
    h.frame("c", s, of_attempt(checkpoint(1, &t, "c-c", 100, 1), 3));
    assert_eq!(checkpoint_ack(&drain(&mut rx)), Disposition::Recorded);
    h.frame("c", s, of_attempt(piece(2, &t, "c-c", 0, &[1; 100]), 3));
    assert_eq!(data_ack(&drain(&mut rx)), Disposition::Recorded);
    assert!(h.core.tasks[&t].latest_checkpoint.is_some());
}

#[test]
fn a_checkpoint_with_more_pieces_than_bytes_or_another_uploads_id_is_refused() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    let other = h.submit_spec(TaskSpec::new("other", serde_json::json!({})));
    drain(&mut rx);
    for (size, chunks) in [(0, 4_000_000_000), (10, 11), (10, 0)] {
        h.frame("a", s, checkpoint(1, &t, "c-1", size, chunks));
        let msgs = drain(&mut rx);
        assert_eq!(
            checkpoint_ack(&msgs),
            Disposition::Rejected,
            "{size} in {chunks}"
        );
        assert!(
            msgs.iter().any(|m| matches!(m, CoordMsg::Error(_))),
            "{msgs:?}"
        );
    }
    assert!(h.core.partial.is_empty());
    // An empty checkpoint is one empty piece.
    h.frame("a", s, checkpoint(2, &t, "c-empty", 0, 1));
    assert_eq!(checkpoint_ack(&drain(&mut rx)), Disposition::Recorded);
    h.frame("a", s, piece(2, &t, "c-empty", 0, b""));
    assert_eq!(data_ack(&drain(&mut rx)), Disposition::Recorded);
    // Another task's upload in progress keeps its id.
    h.frame("a", s, checkpoint(3, &t, "c-2", 10, 2));
    drain(&mut rx);
    let (sb, mut rxb) = h.connect_registering("b", |r| r.executors = vec!["other".into()]);
    drain(&mut rxb);
    h.frame("b", sb, checkpoint(1, &other, "c-2", 10, 2));
    assert_eq!(checkpoint_ack(&drain(&mut rxb)), Disposition::Rejected);
    h.frame("b", sb, piece(2, &other, "c-2", 0, b"12345"));
    assert_eq!(data_ack(&drain(&mut rxb)), Disposition::Rejected);
    let c2 = tether_proto::CheckpointId::parse("c-2").expect("id");
    let p = h.core.partial.get(&c2).expect("c-2 uploading");
    assert_eq!((&p.meta.task_id, p.bytes), (&t, 0));
    // So does its complete one (the store keys pieces by id: a reuse would write into it).
    h.frame("a", s, piece(4, &t, "c-2", 0, b"12345"));
    h.frame("a", s, piece(5, &t, "c-2", 1, b"67890"));
    assert_eq!(data_ack(&drain(&mut rx)), Disposition::Recorded);
    assert!(h.core.partial.is_empty());
    h.frame("b", sb, checkpoint(3, &other, "c-2", 10, 2));
    let msgs = drain(&mut rxb);
    assert_eq!(checkpoint_ack(&msgs), Disposition::Rejected);
    assert!(
        msgs.iter()
            .any(|m| matches!(m, CoordMsg::Error(e) if e.message.contains("one task's"))),
        "{msgs:?}"
    );
    assert!(h.core.partial.is_empty(), "nothing of it kept");
}

fn data_ack(msgs: &[CoordMsg]) -> Disposition {
    ack_of(msgs, "checkpoint_data_ack")
}

/// The checkpoints a write pruned (`SupersedeCheckpoint`) or deleted (`DeleteCheckpoint`).
fn pruned_or_deleted(muts: &[crate::store::Mutation]) -> Vec<String> {
    use crate::store::Mutation;
    muts.iter()
        .filter_map(|m| match m {
            Mutation::SupersedeCheckpoint { checkpoint_id, .. } => {
                Some(format!("pruned {checkpoint_id}"))
            }
            Mutation::DeleteCheckpoint(id) => Some(format!("deleted {id}")),
            _ => None,
        })
        .collect()
}

/// A replay of a checkpoint that was complete and has been pruned since (only the last
/// `checkpoints_kept` are kept) is a duplicate: it neither becomes the latest again nor makes
/// the coordinator prune the newer ones. The lease remembers it until it ends.
#[test]
fn a_replayed_checkpoint_pruned_since_is_a_duplicate_and_the_latest_stays() {
    let mut h = Harness::new();
    assert_eq!(h.core.cfg.checkpoints_kept, 3);
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    drain(&mut rx);
    for (i, id) in ["c-x1", "c-x2", "c-x3", "c-x4"].into_iter().enumerate() {
        let seq = 10 + 2 * i as u64;
        h.frame("a", s, checkpoint(seq, &t, id, 1, 1));
        h.frame("a", s, piece(seq + 1, &t, id, 0, b"x"));
        assert_eq!(data_ack(&drain(&mut rx)), Disposition::Recorded, "{id}");
    }
    assert_eq!(pruned_or_deleted(&h.last_muts), ["pruned c-x1"]);
    let latest = |h: &Harness| {
        let l = h.core.tasks[&t].latest_checkpoint.clone().expect("latest");
        l.checkpoint_id.as_str().to_owned()
    };
    assert_eq!(latest(&h), "c-x4");
    // The replay after lost acknowledgements: the announcement and its piece again.
    h.frame("a", s, checkpoint(10, &t, "c-x1", 1, 1));
    assert_eq!(checkpoint_ack(&drain(&mut rx)), Disposition::Duplicate);
    assert!(h.last_muts.is_empty(), "{:?}", h.last_muts);
    h.frame("a", s, piece(11, &t, "c-x1", 0, b"x"));
    assert_eq!(data_ack(&drain(&mut rx)), Disposition::Duplicate);
    assert!(h.last_muts.is_empty(), "{:?}", h.last_muts);
    assert_eq!(
        Counters::get(&h.core.counters.checkpoint_messages_duplicate),
        2,
        "the announcement and its piece, counted"
    );
    assert_eq!(latest(&h), "c-x4");
    let kept: Vec<&str> = h.core.checkpoint_history[&t]
        .iter()
        .map(|c| c.as_str())
        .collect();
    assert_eq!(kept, ["c-x2", "c-x3", "c-x4"], "nothing deleted");
    // Its id stays this task's while the lease remembers it.
    let (sb, mut rxb) = h.connect_registering("b", |r| r.executors = vec!["other".into()]);
    let other = h.submit_spec(TaskSpec::new("other", serde_json::json!({})));
    drain(&mut rxb);
    h.frame("b", sb, checkpoint(1, &other, "c-x1", 1, 1));
    assert_eq!(checkpoint_ack(&drain(&mut rxb)), Disposition::Rejected);
    // The lease ends: what it remembered goes, from memory and the store.
    h.frame("a", s, result(30, &t, 1));
    assert!(
        h.last_muts
            .iter()
            .any(|m| matches!(m, crate::store::Mutation::ForgetSuperseded(x) if x == &t)),
        "{:?}",
        h.last_muts
    );
    assert!(h.core.superseded.is_empty());
    let x1 = tether_proto::CheckpointId::parse("c-x1").expect("id");
    assert!(!h.core.checkpoint_owner.contains_key(&x1));
}

/// A lease remembers at most `SUPERSEDED_REMEMBERED` pruned checkpoints: the oldest beyond go
/// for good (row and all).
#[test]
fn a_lease_remembers_a_bounded_number_of_pruned_checkpoints() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    drain(&mut rx);
    let n = super::SUPERSEDED_REMEMBERED + 3 + 2;
    for i in 0..n {
        let id = format!("c-{i}");
        let seq = 10 + 2 * i as u64;
        h.frame("a", s, checkpoint(seq, &t, &id, 1, 1));
        h.frame("a", s, piece(seq + 1, &t, &id, 0, b"x"));
        drain(&mut rx);
    }
    assert_eq!(
        pruned_or_deleted(&h.last_muts),
        [format!("pruned c-{}", n - 4), "deleted c-1".to_owned()]
    );
    let remembered = &h.core.superseded[&t].ids;
    assert_eq!(remembered.len(), super::SUPERSEDED_REMEMBERED);
    assert_eq!(remembered.front().map(|c| c.as_str()), Some("c-2"));
    assert_eq!(
        h.core.checkpoint_owner.len(),
        super::SUPERSEDED_REMEMBERED + 3
    );
}

/// An attempt may have at most `UNFINISHED_CHECKPOINTS_PER_ATTEMPT` uploads unfinished at once,
/// however small they declare themselves: past it an announcement is refused with an error
/// that says why. Completing one makes room, and the lease's end drops them all.
#[test]
fn unfinished_checkpoint_uploads_of_an_attempt_are_capped() {
    use super::messages::UNFINISHED_CHECKPOINTS_PER_ATTEMPT as CAP;
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    drain(&mut rx);
    let mut recorded = 0;
    for i in 0..CAP + 10 {
        h.frame(
            "a",
            s,
            checkpoint(10 + i as u64, &t, &format!("c-{i}"), 0, 1),
        );
        let msgs = drain(&mut rx);
        match checkpoint_ack(&msgs) {
            Disposition::Recorded => recorded += 1,
            Disposition::Rejected => assert!(
                msgs.iter().any(|m| matches!(m, CoordMsg::Error(e)
                    if e.message.contains("unfinished checkpoints"))),
                "{msgs:?}"
            ),
            d => panic!("{d:?}"),
        }
    }
    assert_eq!(recorded, CAP);
    assert_eq!(h.core.partial.of_attempt(&t, Attempt(1)), (CAP, 0));
    h.frame("a", s, piece(1000, &t, "c-0", 0, b""));
    assert_eq!(data_ack(&drain(&mut rx)), Disposition::Recorded);
    h.frame("a", s, checkpoint(1001, &t, "c-new", 0, 1));
    assert_eq!(checkpoint_ack(&drain(&mut rx)), Disposition::Recorded);
    h.frame("a", s, result(1002, &t, 1));
    assert_eq!(pruned_or_deleted(&h.last_muts).len(), CAP);
    assert!(h.core.partial.is_empty());
}

/// A piece refused for what it holds is refused with an `error` saying why, as the
/// announcement's refusals are (before, a bare `rejected`).
#[test]
fn a_piece_refused_for_its_content_says_why() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    drain(&mut rx);
    h.frame("a", s, checkpoint(1, &t, "c-1", 4, 2));
    drain(&mut rx);
    let said = |h: &mut Harness, rx: &mut _, msg: WorkerMsg| {
        h.frame("a", s, msg);
        let msgs = drain(rx);
        assert_eq!(data_ack(&msgs), Disposition::Rejected, "{msgs:?}");
        msgs.iter()
            .find_map(|m| match m {
                CoordMsg::Error(e) => Some(e.message.clone()),
                _ => None,
            })
            .expect("an error")
    };
    let m = said(&mut h, &mut rx, piece(2, &t, "c-1", 2, b"ab"));
    assert!(
        m.contains("piece 2 of checkpoint c-1, announced in 2 pieces"),
        "{m}"
    );
    let m = said(&mut h, &mut rx, piece(3, &t, "c-1", 0, b"abcde"));
    assert!(m.contains("past the 4 announced"), "{m}");
    let m = said(&mut h, &mut rx, piece(4, &t, "c-never", 0, b"ab"));
    assert!(m.contains("no accepted announcement"), "{m}");
}

#[test]
fn a_checkpoint_whose_pieces_fall_short_of_its_declared_size_is_dropped_not_resumed_from() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    drain(&mut rx);
    // Declared 900 bytes in one piece; the piece has 5.
    h.frame("a", s, checkpoint(1, &t, "c-short", 900, 1));
    h.frame("a", s, piece(2, &t, "c-short", 0, b"hello"));
    let msgs = drain(&mut rx);
    assert_eq!(data_ack(&msgs), Disposition::Rejected, "{msgs:?}");
    assert!(
        msgs.iter().any(|m| matches!(m, CoordMsg::Error(_))),
        "the worker is told why: {msgs:?}"
    );
    assert!(h.core.tasks[&t].latest_checkpoint.is_none());
    assert!(h.core.partial.is_empty());
    // A consistent one is kept.
    h.frame("a", s, checkpoint(3, &t, "c-good", 5, 1));
    h.frame("a", s, piece(4, &t, "c-good", 0, b"hello"));
    assert_eq!(data_ack(&drain(&mut rx)), Disposition::Recorded);
    let latest = h.core.tasks[&t].latest_checkpoint.clone().expect("latest");
    assert_eq!(latest.checkpoint_id.as_str(), "c-good");
}

fn fetch(seq: u64, task: &TaskId, id: &str, attempt: u32, offset: u64, len: u64) -> WorkerMsg {
    WorkerMsg::CheckpointFetch(tether_proto::msg::CheckpointFetch {
        seq: Seq(seq),
        task_id: task.clone(),
        attempt: Attempt(attempt),
        checkpoint_id: tether_proto::CheckpointId::parse(id).expect("id"),
        offset,
        len,
        timestamp: now(),
    })
}

/// The error of the one `checkpoint_piece` in `msgs`, which must answer `seq`, with its code.
fn piece_error(msgs: &[CoordMsg], seq: u64) -> (tether_proto::msg::ErrorCode, String) {
    let pieces: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            CoordMsg::CheckpointPiece(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(pieces.len(), 1, "{msgs:?}");
    assert_eq!(pieces[0].ack_seq, Seq(seq));
    assert!(pieces[0].data.is_none());
    let code = pieces[0].code.expect("a code");
    (code, pieces[0].error.clone().expect("an error"))
}

#[test]
fn a_checkpoint_fetch_is_served_only_to_the_lease_holder_within_the_checkpoint_and_bounds() {
    let mut h = Harness::new();
    let (a, mut rx_a) = h.connect("a");
    let t = h.submit();
    h.frame("a", a, checkpoint(1, &t, "c-1", 10, 1));
    h.frame("a", a, piece(2, &t, "c-1", 0, b"0123456789"));
    drain(&mut rx_a);
    let (b, mut rx_b) = h.connect("b");
    drain(&mut rx_b);
    // Another worker, another attempt, another checkpoint, a piece past a fetch's bound, a
    // range past the end: each answered with why (which acknowledges the fetch).
    use tether_proto::msg::ErrorCode::{BadFrame, NotLeased, RateLimited};
    let refused = |(c, e): (_, String), code, why: &str| c == code && e.contains(why);
    h.frame("b", b, fetch(1, &t, "c-1", 1, 0, 10));
    assert!(refused(
        piece_error(&drain(&mut rx_b), 1),
        NotLeased,
        "not leased"
    ));
    h.frame("a", a, fetch(3, &t, "c-1", 2, 0, 10));
    assert!(refused(
        piece_error(&drain(&mut rx_a), 3),
        NotLeased,
        "not leased"
    ));
    h.frame("a", a, fetch(4, &t, "c-2", 1, 0, 10));
    assert!(refused(
        piece_error(&drain(&mut rx_a), 4),
        BadFrame,
        "not the latest"
    ));
    h.frame("a", a, fetch(5, &t, "c-1", 1, 0, 0));
    assert!(refused(piece_error(&drain(&mut rx_a), 5), BadFrame, "1 to"));
    // Over 1 MiB, though a frame of 16 MiB would carry it.
    h.frame("a", a, fetch(6, &t, "c-1", 1, 0, 1024 * 1024 + 1));
    assert!(refused(
        piece_error(&drain(&mut rx_a), 6),
        BadFrame,
        "1 to 1048576"
    ));
    h.frame("a", a, fetch(7, &t, "c-1", 1, 10, 5));
    assert!(refused(
        piece_error(&drain(&mut rx_a), 7),
        BadFrame,
        "past the end"
    ));
    // The holder's fetch within the checkpoint is a read of the store, not answered by the
    // core itself; a session has at most so many of them read or unsent at once.
    let max = super::messages::MAX_FETCHES_IN_FLIGHT as u64;
    let mut batch = Batch::default();
    let msgs = (0..max)
        .map(|i| fetch(10 + i, &t, "c-1", 1, 2, 5))
        .collect();
    h.core.apply(
        Event::Frame {
            worker: wid("a"),
            session_id: a,
            msgs,
        },
        &mut batch,
    );
    assert_eq!(batch.reads.len() as u64, max);
    assert!(batch.effects.is_empty());
    h.frame("a", a, fetch(100, &t, "c-1", 1, 2, 5));
    assert!(refused(
        piece_error(&drain(&mut rx_a), 100),
        RateLimited,
        "in flight"
    ));
    // Their pieces written (here: dropped), the session may fetch again.
    drop(batch);
    let mut batch = Batch::default();
    h.core.apply(
        Event::Frame {
            worker: wid("a"),
            session_id: a,
            msgs: vec![fetch(101, &t, "c-1", 1, 2, 5)],
        },
        &mut batch,
    );
    assert_eq!(batch.reads.len(), 1);
}

/// The checkpoint of the task's assignment in `msgs`.
fn assigned_checkpoint(msgs: &[CoordMsg]) -> Option<tether_proto::msg::CheckpointBlob> {
    msgs.iter()
        .find_map(|m| match m {
            CoordMsg::TaskAssignment(a) => Some(a.checkpoint.clone()),
            _ => None,
        })
        .expect("an assignment")
}

#[test]
fn a_checkpoint_too_large_for_an_assignment_is_named_to_a_worker_that_fetches_and_left_out_otherwise()
 {
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.lost_after = std::time::Duration::ZERO;
    let mut h = Harness::with(cfg);
    let (a, mut rx_a) = h.connect("a");
    let t = h.submit();
    let big = vec![7u8; 2_000_000];
    h.frame("a", a, checkpoint(1, &t, "c-1", big.len() as u64, 1));
    h.frame("a", a, piece(2, &t, "c-1", 0, &big));
    drain(&mut rx_a);
    let leave = |h: &mut Harness, worker: &str, session_id: u64| {
        h.step(Event::Disconnected {
            worker: wid(worker),
            session_id,
        });
        sweep(h);
    };
    leave(&mut h, "a", a);
    // Frames of 1 MiB: 2 MB cannot travel in an assignment.
    let (old, mut rx_old) = h.connect_registering("old", |r| {
        r.max_frame = Some(1024 * 1024);
        r.checkpoint_fetch = false;
    });
    assert_eq!(assigned_checkpoint(&drain(&mut rx_old)), None, "left out");
    leave(&mut h, "old", old);
    let (_new, mut rx_new) = h.connect_registering("new", |r| r.max_frame = Some(1024 * 1024));
    let named = assigned_checkpoint(&drain(&mut rx_new)).expect("named");
    assert_eq!(named.checkpoint_id.as_str(), "c-1");
    assert_eq!((named.data, named.size), (None, Some(2_000_000)));
}

#[test]
fn retention_forgets_lost_workers_that_hold_nothing_and_keeps_every_other() {
    let mut h = Harness::with(CoordinatorConfig::new("/nonexistent"));
    let _live = h.connect("live");
    for id in ["gone", "holding", "recent"] {
        let _ = h.connect(id);
    }
    let long_ago = now() - chrono::Duration::days(30);
    for (id, last_seen) in [("gone", long_ago), ("holding", long_ago), ("recent", now())] {
        let w = h.core.workers.get_mut(&wid(id)).expect("worker");
        w.state = WorkerState::Lost;
        w.session = None;
        w.last_seen = last_seen;
    }
    let held = TaskId::parse("t-held").expect("id");
    h.core
        .workers
        .get_mut(&wid("holding"))
        .expect("worker")
        .leases
        .insert(held);

    let mut b = Batch::default();
    h.core
        .expire_workers_lost_before(now() - chrono::Duration::days(1), &mut b);
    let mut left: Vec<String> = h.core.workers.keys().map(|w| w.to_string()).collect();
    left.sort();
    assert_eq!(left, ["holding", "live", "recent"]);
    assert!(!h.core.free.contains(&wid("gone")));
    let deleted: Vec<&WorkerId> = b
        .muts
        .iter()
        .filter_map(|m| match m {
            crate::store::Mutation::DeleteWorker(id) => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, [&wid("gone")]);
    assert_eq!(Counters::get(&h.core.counters.workers_expired), 1);
}

#[test]
fn a_frames_messages_are_applied_in_order_and_those_of_a_replaced_session_not_at_all() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    drain(&mut rx);
    let before = Counters::get(&h.core.counters.messages_in);
    // The same result twice in one frame: recorded, then a duplicate, in that order.
    h.step(Event::Frame {
        worker: wid("a"),
        session_id: s,
        msgs: vec![result(1, &t, 1), result(2, &t, 1)],
    });
    let acks: Vec<(u64, Disposition)> = drain(&mut rx)
        .iter()
        .filter_map(|m| match m {
            CoordMsg::TaskResultAck(a) => Some((a.ack_seq.0, a.disposition)),
            _ => None,
        })
        .collect();
    assert_eq!(
        acks,
        vec![(1, Disposition::Recorded), (2, Disposition::Duplicate)]
    );
    assert_eq!(Counters::get(&h.core.counters.messages_in), before + 2);
    // A frame that arrives on a session since replaced is ignored whole.
    let (_new, mut new_rx) = h.connect("a");
    let before = Counters::get(&h.core.counters.messages_in);
    h.step(Event::Frame {
        worker: wid("a"),
        session_id: s,
        msgs: vec![result(3, &t, 1), result(4, &t, 1)],
    });
    assert_eq!(Counters::get(&h.core.counters.messages_in), before);
    assert!(
        !drain(&mut new_rx)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskResultAck(_)))
    );
    assert_eq!(Counters::get(&h.core.counters.results_duplicate), 1);
}

fn state(seq: u64, task: &TaskId, attempt: u32) -> WorkerMsg {
    WorkerMsg::TaskState(tether_proto::msg::TaskState {
        seq: Seq(seq),
        task_id: task.clone(),
        attempt: Attempt(attempt),
        state: serde_json::from_str(r#"{"n":1}"#).expect("state"),
        timestamp: now(),
    })
}

/// A registration again in the session, in one frame with more messages: it is refused, and
/// those after it follow what the session agreed at its registration (here, acknowledgements
/// by number), not what the refused one asked for.
#[test]
fn messages_after_a_refused_registration_in_the_same_frame_follow_what_the_session_agreed() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect_with("a", true);
    let t = h.submit();
    drain(&mut rx);
    let again = Registration {
        compact_acks: false,
        ..registration("a")
    };
    h.step(Event::Frame {
        worker: wid("a"),
        session_id: s,
        msgs: vec![WorkerMsg::Registration(again), state(1, &t, 1)],
    });
    let got = sent_names(&mut rx);
    assert_eq!(got, ["error", "recorded 1"]);
}

/// A worker registers once a session. A registration again in it (without authentication the
/// session hands it to the core) is answered `error` `unexpected` and reconciles nothing: each
/// sent again every lease its inventory left out, its checkpoint read on the store writer's
/// thread, and restarted the lease's clock.
#[test]
fn registrations_again_in_the_same_session_are_refused_and_send_no_assignment_again() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect_registering("a", |r| r.checkpoint_fetch = false);
    let t = h.submit();
    let first = drain(&mut rx);
    assert_eq!(
        first
            .iter()
            .filter(|m| matches!(m, CoordMsg::TaskAssignment(_)))
            .count(),
        1
    );
    let lease = h.core.tasks[&t].lease.clone().expect("leased");
    let started = h.core.tasks[&t].lease_started;
    let registrations_before = Counters::get(&h.core.counters.registrations);
    let mut effects = 0;
    let mut muts = 0;
    let repeats = 1_000;
    let frames: Vec<usize> = (0..repeats).collect();
    for frame in frames.chunks(super::FRAME_EVENT_MESSAGES) {
        let msgs = frame
            .iter()
            .map(|_| WorkerMsg::Registration(registration("a")))
            .collect();
        let mut b = Batch::default();
        h.core.apply(
            Event::Frame {
                worker: wid("a"),
                session_id: s,
                msgs,
            },
            &mut b,
        );
        // A job on the writer's connection (an assignment's checkpoint read is one).
        effects += b
            .effects
            .iter()
            .filter(|e| matches!(e, crate::store::Effect::Run(_)))
            .count();
        muts += b.muts.len() + b.reads.len();
        for e in b.effects {
            e.run(&h.conn);
        }
    }
    let got = drain(&mut rx);
    let errors: Vec<_> = got
        .iter()
        .filter_map(|m| match m {
            CoordMsg::Error(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), repeats, "{got:?}");
    assert!(errors.iter().all(|e| {
        e.code == tether_proto::msg::ErrorCode::Unexpected
            && e.offending_type.as_deref() == Some("registration")
    }));
    assert_eq!(got.len(), repeats, "nothing but the errors: {got:?}");
    assert_eq!(
        (effects, muts),
        (0, 0),
        "no job for the writer, nothing written or read"
    );
    assert_eq!(
        Counters::get(&h.core.counters.registrations),
        registrations_before
    );
    assert_eq!(h.core.tasks[&t].lease.as_ref(), Some(&lease));
    assert_eq!(h.core.tasks[&t].lease_started, started);
    // The session stays, and a registration on a new one is reconciled as ever: the lease
    // it leaves out is sent again.
    assert!(h.core.current_session(&wid("a"), s).is_some());
    let (_s2, mut rx2) = h.connect("a");
    assert!(
        drain(&mut rx2)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(a) if a.task_id == t))
    );
}

/// A worker that registers again and again on new sessions, leaving its lease out each time,
/// gets the assignment each time; but only the first resend restarts the lease's clock, so the
/// timeout backstop still ends the task (each resend restarting it kept it running for ever).
#[tokio::test(start_paused = true)]
async fn registrations_again_and_again_on_new_sessions_do_not_keep_a_task_past_its_timeout() {
    use std::time::Duration;
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.lost_after = Duration::from_secs(10);
    let mut h = Harness::with(cfg);
    let (_s, mut rx) = h.connect("a");
    let mut spec = TaskSpec::new("sleep", serde_json::json!({}));
    spec.timeout_ms = Some(1_000);
    let t = h.submit_spec(spec);
    drain(&mut rx);
    let mut resent = 0;
    // The first resend at 2 s restarts the clock: timeout and grace (11 s) pass at 13 s.
    for _ in 0..20 {
        tokio::time::advance(Duration::from_secs(2)).await;
        sweep(&mut h);
        if h.core.tasks[&t].status != TaskStatus::Running {
            break;
        }
        let (_s, mut rx) = h.connect("a");
        resent += drain(&mut rx)
            .iter()
            .filter(|m| matches!(m, CoordMsg::TaskAssignment(a) if a.task_id == t))
            .count();
    }
    assert_eq!(h.core.tasks[&t].status, TaskStatus::TimedOut);
    assert_eq!(
        resent, 6,
        "sent again at 2, 4, ..., 12 s; timed out at 14 s"
    );
}

#[test]
fn a_session_that_agreed_to_compact_acks_gets_recorded_messages_acknowledged_by_number() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect_with("a", true);
    let t = h.submit();
    drain(&mut rx);
    // Recorded: by number; a result keeps its whole ack (it names the task); a message about
    // an attempt the worker does not hold is answered whole too (rejected, with an error).
    h.step(Event::Frame {
        worker: wid("a"),
        session_id: s,
        msgs: vec![
            state(1, &t, 1),
            state(2, &t, 1),
            result(3, &t, 1),
            state(4, &t, 7),
        ],
    });
    let got = sent_names(&mut rx);
    assert_eq!(
        got,
        vec![
            "recorded 1",
            "recorded 2",
            "task_result_ack",
            "error",
            "task_state_ack"
        ]
    );
    // Without the agreement, every ack is whole.
    let mut h = Harness::new();
    let (s, mut rx) = h.connect_with("b", false);
    let t = h.submit();
    drain(&mut rx);
    h.frame("b", s, state(1, &t, 1));
    let acks = drain(&mut rx);
    assert!(
        matches!(&acks[..], [CoordMsg::TaskStateAck(a)] if a.disposition == Disposition::Recorded),
        "{acks:?}"
    );
}

/// A worker reporting its statistics many times a second has its record announced to event
/// streams at most once a second for them: each announcement is a copy of the record that
/// every stream serializes.
#[tokio::test(start_paused = true)]
async fn telemetry_announces_the_worker_at_most_once_a_second() {
    let mut h = Harness::new();
    let (tx, mut changes) = tokio::sync::broadcast::channel(64);
    h.core.changes = Some(tx);
    let (s, mut rx) = h.connect("a");
    drain(&mut rx);
    let mut announced = |h: &mut Harness, from: u64| {
        while changes.try_recv().is_ok() {}
        for seq in from..from + 10 {
            h.frame(
                "a",
                s,
                WorkerMsg::Telemetry(tether_proto::msg::Telemetry {
                    seq: Seq(seq),
                    connection_stats: Default::default(),
                    metrics: serde_json::Value::Null.into(),
                    timestamp: now(),
                }),
            );
        }
        let mut n = 0;
        while let Ok(c) = changes.try_recv() {
            n += usize::from(matches!(c, super::Change::Worker(_)));
        }
        n
    };
    assert_eq!(
        announced(&mut h, 1),
        1,
        "ten reports at once: one announcement"
    );
    tokio::time::advance(std::time::Duration::from_millis(999)).await;
    assert_eq!(announced(&mut h, 11), 0);
    tokio::time::advance(std::time::Duration::from_millis(1)).await;
    assert_eq!(announced(&mut h, 21), 1, "a second on");
}

/// A worker's report with figures out of range (a round-trip time of 1.7e308 ms, negative,
/// a ratio of 7) is kept made sane: it would spoil the fleet's figures (the round-trip
/// histogram's sum, the overview's mean) until a restart.
#[test]
fn reported_connection_figures_are_kept_only_within_range() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    drain(&mut rx);
    let stats = tether_proto::task::ConnStats {
        rtt_samples: 1,
        rtt_p50_ms: 1.7e308,
        rtt_p95_ms: -5.0,
        stability: 7.0,
        ..Default::default()
    };
    h.frame(
        "a",
        s,
        WorkerMsg::Telemetry(tether_proto::msg::Telemetry {
            seq: Seq(1),
            connection_stats: stats,
            metrics: serde_json::Value::Null.into(),
            timestamp: now(),
        }),
    );
    let kept = h.core.workers[&wid("a")].stats.clone().expect("kept");
    assert_eq!(
        (
            kept.stats.rtt_p50_ms,
            kept.stats.rtt_p95_ms,
            kept.stats.stability
        ),
        (0.0, 0.0, 1.0)
    );
}

#[tokio::test(start_paused = true)]
async fn telemetry_updates_the_statistics_every_time_and_saves_the_record_at_most_every_period() {
    use crate::store::Mutation;
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    drain(&mut rx);
    let telemetry = |seq: u64, reconnects: u64| {
        let stats = tether_proto::task::ConnStats {
            reconnects,
            ..Default::default()
        };
        Event::Frame {
            worker: wid("a"),
            session_id: s,
            msgs: vec![WorkerMsg::Telemetry(tether_proto::msg::Telemetry {
                seq: Seq(seq),
                connection_stats: stats,
                metrics: serde_json::Value::Null.into(),
                timestamp: now(),
            })],
        }
    };
    // Applies a report; returns the reconnects of each worker record it saves, and its ack.
    let mut report = |h: &mut Harness, seq: u64, reconnects: u64| {
        let mut b = Batch::default();
        h.core.apply(telemetry(seq, reconnects), &mut b);
        let saved: Vec<u64> = b
            .muts
            .iter()
            .filter_map(|m| match m {
                Mutation::PutWorker(w) => Some(w.stats.as_ref().map_or(0, |s| s.reconnects)),
                _ => None,
            })
            .collect();
        for e in b.effects {
            e.run(&h.conn);
        }
        let acked = drain(&mut rx).iter().any(
            |m| matches!(m, CoordMsg::TelemetryAck(a) if a.ack_seq == Seq(seq) && a.disposition == Disposition::Recorded),
        );
        assert_eq!(
            h.core.workers[&wid("a")]
                .stats
                .as_ref()
                .map(|s| s.reconnects),
            Some(reconnects),
            "kept from every report"
        );
        (saved, acked)
    };
    // The registration saved the record a moment ago, without statistics: a worker's first
    // report is saved, or a restart would show it with none for a whole period.
    assert_eq!(
        report(&mut h, 1, 1),
        (vec![1], true),
        "a worker's first report is saved"
    );
    assert_eq!(
        report(&mut h, 2, 2),
        (vec![], true),
        "a report within the period only updates the model"
    );
    tokio::time::advance(super::messages::STATS_SAVE_EVERY - std::time::Duration::from_secs(1))
        .await;
    assert_eq!(report(&mut h, 3, 3), (vec![], true));
    tokio::time::advance(std::time::Duration::from_secs(1)).await;
    assert_eq!(
        report(&mut h, 4, 4),
        (vec![4], true),
        "a period after the last save, saved with the latest"
    );
    assert_eq!(report(&mut h, 5, 5), (vec![], true));
    tokio::time::advance(super::messages::STATS_SAVE_EVERY).await;
    assert_eq!(report(&mut h, 6, 6), (vec![6], true));
    // A registration with statistics known saves them: the next report is not saved again.
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: s,
    });
    let (s2, mut rx2) = h.connect("a");
    drain(&mut rx2);
    let mut b = Batch::default();
    h.core.apply(
        Event::Frame {
            worker: wid("a"),
            session_id: s2,
            msgs: vec![WorkerMsg::Telemetry(tether_proto::msg::Telemetry {
                seq: Seq(7),
                connection_stats: Default::default(),
                metrics: serde_json::Value::Null.into(),
                timestamp: now(),
            })],
        },
        &mut b,
    );
    assert!(
        !b.muts.iter().any(|m| matches!(m, Mutation::PutWorker(_))),
        "a report right after a registration that saved statistics is not saved"
    );
}

/// A batch of messages only (a telemetry report's ack) is delivered by the core itself while
/// the writer has nothing unfinished, and waits behind any batch the writer has not finished:
/// no message overtakes one queued before it.
#[tokio::test]
async fn a_batch_of_messages_only_skips_an_idle_writer_and_never_overtakes_an_unfinished_one() {
    use crate::store::{Handoff, StoreStats};
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    // No sweep while it runs: with a worker connected a sweep saves that the coordinator is
    // alive, a batch of its own the writer would get among the ones counted here (when the
    // core swept at its start, that sweep raced the registration: 1 run in 4 failed on it).
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.sweep_interval = Duration::from_secs(3600);
    let core = Core::new(
        Arc::new(cfg),
        Loaded::default(),
        Arc::new(Counters::default()),
    );
    let (events, events_rx) = tokio::sync::mpsc::channel(16);
    let (tx, mut writer) = tokio::sync::mpsc::channel(16);
    let stats = Arc::new(StoreStats::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let core_task =
        tokio::spawn(core.run(events_rx, Handoff::new(tx, stats.clone()), stop.clone()));
    let conn = rusqlite::Connection::open_in_memory().expect("sqlite");
    let frame = |msg: WorkerMsg| Event::Frame {
        worker: wid("a"),
        session_id: 1,
        msgs: vec![msg],
    };
    let telemetry = |seq: u64| {
        frame(WorkerMsg::Telemetry(tether_proto::msg::Telemetry {
            seq: Seq(seq),
            connection_stats: Default::default(),
            metrics: serde_json::Value::Null.into(),
            timestamp: now(),
        }))
    };
    let within = |what: &'static str| {
        move |r: Result<Option<Batch>, tokio::time::error::Elapsed>| {
            r.expect(what).expect("core alive")
        }
    };
    let (session, mut mailbox) = super::mailbox::channel();
    events
        .send(Event::Connected {
            worker: wid("a"),
            session: SessionRef::new(1, session),
            registration: Box::new(Registration {
                executors: vec![],
                ..registration("a")
            }),
        })
        .await
        .expect("core");
    let second = Duration::from_secs(5);
    let registered =
        within("the registration's batch")(tokio::time::timeout(second, writer.recv()).await);
    assert!(
        !registered.muts.is_empty(),
        "the registration saves the worker"
    );
    // A worker's first report is saved (a restart would show it without statistics).
    events.send(telemetry(0)).await.expect("core");
    let first =
        within("the first report's batch")(tokio::time::timeout(second, writer.recv()).await);
    assert!(!first.muts.is_empty(), "a worker's first report is saved");
    // The writer has not finished those batches: the next report's ack goes behind them.
    events.send(telemetry(1)).await.expect("core");
    let behind = within("the report's batch, behind the registration's")(
        tokio::time::timeout(second, writer.recv()).await,
    );
    assert!(
        behind.muts.is_empty(),
        "the report saves nothing: {:?}",
        behind.muts
    );
    assert!(
        matches!(mailbox.try_recv(), Err(super::mailbox::TryRecvError::Empty)),
        "nothing was delivered ahead of the writer"
    );
    for e in registered
        .effects
        .into_iter()
        .chain(first.effects)
        .chain(behind.effects)
    {
        e.run(&conn);
    }
    stats.batches.fetch_add(3, Ordering::Release);
    let sent = drain(&mut mailbox);
    assert!(
        matches!(&sent[..], [CoordMsg::RegistrationAck(_), CoordMsg::TelemetryAck(z), CoordMsg::TelemetryAck(a)] if z.ack_seq == Seq(0) && a.ack_seq == Seq(1)),
        "{sent:?}"
    );
    // Nothing unfinished: the next report's ack comes from the core, the writer sees nothing.
    events.send(telemetry(2)).await.expect("core");
    let ack = tokio::time::timeout(second, mailbox.recv())
        .await
        .expect("the ack, without the writer")
        .expect("session open");
    assert!(
        matches!(&ack, Outgoing::Msg(m) if matches!(&**m, CoordMsg::TelemetryAck(a) if a.ack_seq == Seq(2))),
        "{ack:?}"
    );
    assert!(writer.try_recv().is_err(), "the writer was not woken");
    assert_eq!(stats.delivered_directly.load(Ordering::Relaxed), 1);
    stop.cancel();
    core_task.await.expect("core ends");
}

/// Each running task an inventory lists is a directive in the ack: a registration listing
/// more than the bound is refused saying so (4002, `bad_frame`), one at the bound is answered.
#[test]
fn a_registration_listing_more_running_tasks_than_the_bound_is_refused_saying_why() {
    use super::messages::MAX_INVENTORY_RUNNING;
    let running = |n: usize| -> Vec<tether_proto::task::TaskRef> {
        (0..n)
            .map(|i| tether_proto::task::TaskRef {
                task_id: TaskId::parse(&format!("t-{i}")).expect("id"),
                attempt: Attempt(1),
                paused: false,
            })
            .collect()
    };
    let mut h = Harness::new();
    let (_, mut rx) = h.connect_registering("a", |r| {
        r.inventory.running = running(MAX_INVENTORY_RUNNING + 1);
    });
    let sent = drain(&mut rx);
    let error = error_sent(&sent);
    assert_eq!(error.code, tether_proto::msg::ErrorCode::BadFrame);
    assert!(
        error.message.contains("inventory lists 4097 running tasks"),
        "{}",
        error.message
    );
    assert!(
        !sent
            .iter()
            .any(|m| matches!(m, CoordMsg::RegistrationAck(_)))
    );
    assert!(h.core.workers.is_empty(), "the core never took it");
    let (_, mut rx) = h.connect_registering("b", |r| {
        r.inventory.running = running(MAX_INVENTORY_RUNNING);
    });
    let ack = drain(&mut rx)
        .into_iter()
        .find_map(|m| match m {
            CoordMsg::RegistrationAck(a) => Some(a),
            _ => None,
        })
        .expect("an ack");
    assert_eq!(ack.directives.len(), MAX_INVENTORY_RUNNING);
}

/// `n` running tasks for an inventory, each of id `t-<i>` padded with `-`s to `id_len` bytes,
/// at `attempt`.
fn running_of(n: usize, id_len: usize, attempt: u32) -> Vec<tether_proto::task::TaskRef> {
    (0..n)
        .map(|i| tether_proto::task::TaskRef {
            task_id: TaskId::parse(&format!("{:-<id_len$}", format!("t-{i}"))).expect("id"),
            attempt: Attempt(attempt),
            paused: false,
        })
        .collect()
}

/// Every message in the mailbox, and the code of the close after them, if any.
fn drain_to_close(rx: &mut super::mailbox::Receiver<Outgoing>) -> (Vec<CoordMsg>, Option<u16>) {
    let mut sent = Vec::new();
    while let Ok(out) = rx.try_recv() {
        match out {
            Outgoing::Msg(m) => sent.push(*m),
            Outgoing::Close(c) => return (sent, Some(c.0)),
            _ => {}
        }
    }
    (sent, None)
}

/// The first `error` among `sent`, which must hold one.
fn error_sent(sent: &[CoordMsg]) -> &tether_proto::msg::ErrorMsg {
    sent.iter()
        .find_map(|m| match m {
            CoordMsg::Error(e) => Some(e),
            _ => None,
        })
        .expect("an error saying why")
}

/// The `registration_ack` among `sent`, if any.
fn registration_ack(sent: &[CoordMsg]) -> Option<&tether_proto::msg::RegistrationAck> {
    sent.iter().find_map(|m| match m {
        CoordMsg::RegistrationAck(a) => Some(a),
        _ => None,
    })
}

/// The `registration_ack` states the coordinator's grace (`lost_after_ms`): a worker holding
/// leased work keeps its reconnect delays well below it, so that its own backoff does not
/// keep it away past it once the path is back.
#[test]
fn the_registration_ack_states_the_coordinators_grace() {
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.lost_after = std::time::Duration::from_secs(42);
    let mut h = Harness::with(cfg);
    let (_, mut rx) = h.connect_registering("a", |_| {});
    let sent = drain(&mut rx);
    let ack = registration_ack(&sent).expect("an ack");
    assert_eq!(ack.lost_after_ms, Some(42_000));
}

/// A disconnected worker's record, as the API lists it, says when its grace ends
/// (`lost_at`, `--lost-after` from the disconnection): a client cannot know the coordinator's
/// grace. A connected worker's says nothing; nor does the stored record.
#[test]
fn a_disconnected_workers_record_says_when_its_grace_ends() {
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.lost_after = std::time::Duration::from_secs(42);
    let mut h = Harness::with(cfg);
    let (sa, _rx_a) = h.connect("a");
    let (_sb, _rx_b) = h.connect("b");
    let listed = |h: &mut Harness| {
        let (reply, mut rx) = tokio::sync::oneshot::channel();
        h.step(Event::Api(Api::ListWorkers { reply }));
        rx.try_recv().expect("reply").expect("workers")
    };
    assert!(listed(&mut h).iter().all(|w| w.lost_at.is_none()));
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: sa,
    });
    let workers = listed(&mut h);
    let a = workers.iter().find(|w| w.worker_id == wid("a")).expect("a");
    let grace = a.lost_at.expect("lost_at") - a.disconnected_at.expect("disconnected_at");
    assert!(
        (41_900..=42_100).contains(&grace.num_milliseconds()),
        "{grace:?}"
    );
    let b = workers.iter().find(|w| w.worker_id == wid("b")).expect("b");
    assert_eq!(b.lost_at, None);
    assert!(
        h.core.workers.values().all(|w| w.lost_at.is_none()),
        "only the views say it"
    );
    let json = serde_json::to_value(a).expect("json");
    assert!(json["lost_at"].is_string(), "{json}");
}

/// The worker takes frames up to its `max_frame`, and the ack carries a directive for each
/// running task its inventory lists in one frame: an ack larger than that frame was refused
/// by the worker as oversize, its session ended and it registered again into the same ack, for
/// ever. Such a registration is refused instead, saying both sizes, and nothing is sent that
/// the worker could not take.
#[test]
fn a_registration_whose_ack_would_not_fit_its_max_frame_is_refused_naming_both_sizes() {
    let mut h = Harness::new();
    let (_, mut rx) = h.connect_registering("small", |r| {
        r.max_frame = Some(32 * 1024);
        r.inventory.running = running_of(400, 36, 1);
    });
    let (sent, close) = drain_to_close(&mut rx);
    if let Some(ack) = registration_ack(&sent) {
        let bytes = tether_proto::encode(&CoordMsg::RegistrationAck(ack.clone())).len();
        panic!("an ack of {bytes} bytes went to a worker taking frames of 32768");
    }
    let error = error_sent(&sent);
    assert_eq!(error.code, tether_proto::msg::ErrorCode::BadFrame);
    let largest = 400 * (56 + 36 + 1 + 58) + super::messages::ACK_FIELDS_BYTES;
    for says in [
        "inventory of 400 running tasks".to_owned(),
        format!("may take {largest} bytes"),
        "max_frame of 32768 bytes".to_owned(),
    ] {
        assert!(error.message.contains(&says), "{}", error.message);
    }
    assert_eq!(close, Some(4002));
    assert!(h.core.workers.is_empty(), "the core never took it");
}

/// The bound is the directives' largest form: the most running tasks of the longest ids and
/// attempts that a frame of 32 KiB admits, each answered `cancel` with the longer reason (no
/// task is leased to the worker), get an ack that fits in that frame with its integrity tag;
/// one task more is refused.
#[test]
fn the_most_running_tasks_a_frame_admits_get_an_ack_that_fits_in_it() {
    let frame = tether_proto::settings::MIN_FRAME;
    let per_task = 56 + tether_proto::ids::MAX_ID_LEN + 10 + 58;
    let most = (frame - super::messages::ACK_FIELDS_BYTES) / per_task;
    let mut h = Harness::new();
    let register = |r: &mut Registration, n: usize| {
        r.max_frame = Some(frame as u64);
        r.compression = vec![tether_proto::compress::ZSTD.to_owned()];
        r.batching = true;
        r.compact_acks = true;
        r.inventory.running = running_of(n, tether_proto::ids::MAX_ID_LEN, u32::MAX);
    };
    let (_, mut rx) = h.connect_registering("a", |r| register(r, most));
    let sent = drain(&mut rx);
    let ack = registration_ack(&sent).expect("an ack");
    assert_eq!(ack.directives.len(), most);
    assert!(
        ack.directives
            .iter()
            .all(|d| d.action == tether_proto::msg::DirectiveAction::Cancel)
    );
    let bytes = tether_proto::encode(&CoordMsg::RegistrationAck(ack.clone())).len()
        + tether_proto::integrity::TEXT_TRAILER;
    assert!(bytes <= frame, "{bytes} bytes");
    let (_, mut rx) = h.connect_registering("b", |r| register(r, most + 1));
    let (sent, close) = drain_to_close(&mut rx);
    assert!(registration_ack(&sent).is_none());
    assert_eq!(close, Some(4002));
}

/// What [`super::messages::largest_directive`] counts is what a directive takes, at its
/// largest; and an ack's other fields, at their largest, with its integrity tag, take no more
/// than their allowance.
#[test]
fn the_largest_registration_ack_without_directives_fits_in_its_allowance() {
    use tether_proto::msg::{Directive, DirectiveAction, Rate, RegistrationAck};
    for (id_len, attempt) in [(1, 0), (1, 9), (36, 10), (128, u32::MAX)] {
        let task_id = TaskId::parse(&"t".repeat(id_len)).expect("id");
        let largest = [
            "the task moved on while this worker was away",
            "this coordinator has no lease of that task for this worker",
        ]
        .map(|reason| {
            tether_proto::encode(&Directive {
                task_id: task_id.clone(),
                attempt: Attempt(attempt),
                action: DirectiveAction::Cancel,
                reason: reason.to_owned(),
            })
            .len()
                + 1
        })
        .into_iter()
        .max();
        assert_eq!(
            Some(super::messages::largest_directive(
                &task_id,
                Attempt(attempt)
            )),
            largest
        );
    }
    let rate = Rate {
        per_sec: -f64::MAX / 3.0,
        burst: u32::MAX,
    };
    let ack = CoordMsg::RegistrationAck(RegistrationAck {
        worker_id: wid(&"w".repeat(tether_proto::ids::MAX_ID_LEN)),
        session_id: u64::MAX,
        directives: Vec::new(),
        compression: Some(tether_proto::compress::ZSTD.to_owned()),
        batching: Some(tether_proto::msg::Batching {
            max_messages: u32::MAX,
            max_bytes: u64::MAX,
        }),
        compact_acks: true,
        max_frame: Some(u64::MAX),
        max_checkpoint: Some(u64::MAX),
        message_rate: Some(rate),
        byte_rate: Some(rate),
        lost_after_ms: Some(u64::MAX),
        timestamp: now(),
    });
    let bytes = tether_proto::encode(&ack).len() + tether_proto::integrity::TEXT_TRAILER;
    assert!(bytes <= super::messages::ACK_FIELDS_BYTES, "{bytes} bytes");
}

#[test]
fn a_registration_taking_frames_under_the_least_every_peer_takes_is_refused() {
    let mut h = Harness::new();
    let t = h.submit();
    let (_, mut rx) = h.connect_registering("tiny", |r| r.max_frame = Some(16 * 1024));
    assert_eq!(close_code(&mut rx), Some(4002));
    assert!(!h.core.workers.contains_key(&wid("tiny")), "no record");
    assert_eq!(
        h.core.tasks[&t].status,
        TaskStatus::Queued,
        "nothing leased to it"
    );
}

#[test]
fn a_config_no_assignment_can_carry_is_refused_and_one_only_larger_frames_carry_waits_for_them() {
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.max_frame = 2 * 1024 * 1024;
    let mut h = Harness::with(cfg);
    let config = |bytes: usize| serde_json::json!({ "pad": "x".repeat(bytes) });
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    h.step(Event::Api(Api::Submit {
        specs: vec![TaskSpec::new("sleep", config(2 * 1024 * 1024))],
        reply: tx,
    }));
    let e = rx.try_recv().expect("reply").expect_err("refused");
    assert!(
        e.to_string().contains("does not fit in an assignment"),
        "{e}"
    );
    assert!(h.core.tasks.is_empty());
    // 1.5 MB fits the coordinator's frames, not those of a worker that takes 1 MiB: it is
    // never sent there (it would end the session at every registration), and it waits.
    let big = h.submit_spec(TaskSpec::new("sleep", config(1_500_000)));
    let (_s, mut small) = h.connect_registering("small", |r| r.max_frame = Some(1024 * 1024));
    let assigned = |rx: &mut super::mailbox::Receiver<Outgoing>| -> Vec<TaskId> {
        drain(rx)
            .into_iter()
            .filter_map(|m| match m {
                CoordMsg::TaskAssignment(a) => Some(a.task_id),
                _ => None,
            })
            .collect()
    };
    assert_eq!(assigned(&mut small), Vec::<TaskId>::new());
    assert_eq!(h.core.tasks[&big].status, TaskStatus::Queued);
    assert_eq!(h.core.tasks[&big].attempt, Attempt(0), "no attempt spent");
    // The small worker is free for what fits, queued behind or not.
    let next = h.submit();
    assert_eq!(assigned(&mut small), vec![next]);
    // A worker whose frames carry it takes it.
    let (s_large, mut large) = h.connect_registering("large", |r| r.max_frame = Some(4 << 20));
    assert_eq!(assigned(&mut large), vec![big.clone()]);
    // Should it come back taking smaller frames without having received the assignment, the
    // task goes back to the queue instead of to it (or failing).
    h.step(Event::Disconnected {
        worker: wid("large"),
        session_id: s_large,
    });
    let (_, mut shrunk) = h.connect_registering("large", |r| r.max_frame = Some(1024 * 1024));
    assert_eq!(assigned(&mut shrunk), Vec::<TaskId>::new());
    let task = &h.core.tasks[&big];
    assert_eq!(task.status, TaskStatus::Queued);
    assert!(task.lease.is_none());
    assert_eq!(
        task.attempts.last().and_then(|a| a.end.as_deref()),
        Some("lost")
    );
    // Its config still fits the coordinator's frames, and a worker of large frames ends it.
    let (_, mut third) = h.connect_registering("third", |r| r.max_frame = Some(2 << 20));
    assert_eq!(assigned(&mut third), vec![big]);
}

#[test]
fn a_task_whose_config_outgrew_a_lowered_coordinator_frame_limit_fails_at_its_lease() {
    let mut h = Harness::new();
    let big = h.submit_spec(TaskSpec::new(
        "sleep",
        serde_json::json!({ "pad": "x".repeat(100_000) }),
    ));
    // As after a restart with a lower `max_frame` than when it was submitted.
    Arc::make_mut(&mut h.core.cfg).max_frame = 64 * 1024;
    let (_, mut rx) = h.connect("w");
    assert!(
        !drain(&mut rx)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(_)))
    );
    let task = &h.core.tasks[&big];
    assert_eq!(task.status, TaskStatus::Failed);
    let error = task.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("worker w") && error.contains("65536"),
        "{error}"
    );
}

/// The upload bookkeeping of a task with thousands of unfinished uploads: each is indexed and
/// dropped once, by attempt, with the count and the declared bytes of its attempt kept as it
/// goes (a list walked per announcement and per removal made such a task cost the core
/// quadratic time).
#[test]
fn the_upload_bookkeeping_keeps_each_attempts_count_and_bytes_through_thousands_of_uploads() {
    let t = TaskId::parse("t-many").expect("id");
    let meta = |i: usize, attempt: u32| crate::model::CheckpointMeta {
        checkpoint_id: tether_proto::CheckpointId::parse(&format!("c-{i}")).expect("id"),
        task_id: t.clone(),
        attempt: Attempt(attempt),
        worker: wid("a"),
        size: 2,
        chunks: 1,
        created_at: now(),
    };
    let mut u = super::Uploads::default();
    for i in 0..20_000 {
        u.insert(super::Partial {
            meta: meta(i, 1 + (i % 2) as u32),
            received: Default::default(),
            bytes: 0,
        });
    }
    assert_eq!(u.of_attempt(&t, Attempt(1)), (10_000, 20_000));
    assert_eq!(u.of_attempt(&t, Attempt(2)), (10_000, 20_000));
    // The same id again replaces its upload: counted once, under its new attempt.
    u.insert(super::Partial {
        meta: meta(0, 2),
        received: Default::default(),
        bytes: 0,
    });
    assert_eq!(u.of_attempt(&t, Attempt(1)), (9_999, 19_998));
    assert_eq!(u.of_attempt(&t, Attempt(2)), (10_001, 20_002));
    for i in (1..20_000).step_by(2) {
        let id = tether_proto::CheckpointId::parse(&format!("c-{i}")).expect("id");
        assert!(u.remove(&id).is_some());
    }
    assert_eq!(u.of_attempt(&t, Attempt(2)), (1, 2));
    let dropped = u.remove_ended(&t, Some(Attempt(2)));
    assert_eq!(dropped.len(), 9_999);
    assert_eq!(u.of_attempt(&t, Attempt(1)), (0, 0));
    assert_eq!(u.remove_ended(&t, None).len(), 1);
    assert!(u.is_empty());
}

fn stop_notice() -> tether_proto::msg::StopNotice {
    tether_proto::msg::StopNotice { timestamp: now() }
}

/// `worker_stopping` takes the worker out of dispatch at once; what it holds stays leased to
/// it (its results may still come). A registration (the process started again) takes it back.
#[test]
fn a_stopping_worker_gets_no_new_task_and_keeps_what_it_holds() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect_registering("a", |r| r.slots = 2);
    let done = h.submit();
    let held = h.submit();
    assert_eq!(h.core.tasks[&held].status, TaskStatus::Running);
    drain(&mut rx);
    h.frame("a", s, WorkerMsg::WorkerStopping(stop_notice()));
    assert!(h.core.workers[&wid("a")].stopping);
    // A result frees a slot: still nothing goes to a stopping worker.
    h.frame("a", s, result(1, &done, 1));
    assert_eq!(h.core.tasks[&done].status, TaskStatus::Completed);
    let next = h.submit();
    assert_eq!(h.core.tasks[&next].status, TaskStatus::Queued);
    assert!(
        !drain(&mut rx)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(_))),
        "no assignment after worker_stopping"
    );
    assert!(h.core.tasks[&held].lease.is_some(), "what it holds stays");
    // The same process registers again (its link dropped while it stopped, and it came back
    // to hand back what it holds): still stopping, it gets nothing. A task leased to it would
    // never run, and would use up an attempt when the worker says it stopped.
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: s,
    });
    let (_s2, mut rx2) = h.connect_registering("a", |r| r.slots = 2);
    assert!(h.core.workers[&wid("a")].stopping);
    assert_eq!(h.core.tasks[&next].status, TaskStatus::Queued);
    assert!(
        !drain(&mut rx2)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(a) if a.task_id == next)),
        "no new task for the stopping process come back"
    );
    // A new process of the worker takes work again.
    let (_s3, _rx3) = h.connect_registering("a", |r| {
        r.slots = 2;
        r.boot_id = "b-new".into();
    });
    assert!(!h.core.workers[&wid("a")].stopping);
    assert_eq!(h.core.tasks[&next].status, TaskStatus::Running);
}

/// An operator's drain of worker `id` (`on`) or its undoing, answered.
fn drain_command(
    h: &mut Harness,
    id: &str,
    on: bool,
) -> Result<crate::model::Worker, crate::core::ApiError> {
    let (tx, mut reply) = tokio::sync::oneshot::channel();
    h.step(Event::Api(Api::DrainWorker {
        worker: wid(id),
        drain: on,
        reply: tx,
    }));
    reply.try_recv().expect("reply")
}

/// Whether the last step saved worker `id`'s record, drained or not.
fn saved_draining(h: &Harness, id: &str) -> Option<bool> {
    h.last_muts.iter().find_map(|m| match m {
        crate::store::Mutation::PutWorker(w) if w.worker_id == wid(id) => Some(w.draining),
        _ => None,
    })
}

/// An operator's drain takes a worker out of dispatch: what it holds runs on to its result,
/// nothing new goes to it, through its reconnection and a new process of it; undrained, it is
/// offered the queue at once. The record is saved at each change; the same command again
/// changes nothing; an unknown worker is not found. The session is told each change (its
/// heartbeat replies say `draining`), a new session from its start.
#[test]
fn a_drained_worker_finishes_what_it_holds_and_takes_nothing_new_until_undrained() {
    let told = |h: &Harness| {
        h.core.workers[&wid("a")]
            .session
            .as_ref()
            .expect("a session")
            .seen
            .drained()
    };
    let mut h = Harness::new();
    let (s, mut rx) = h.connect_registering("a", |r| r.slots = 2);
    assert!(!told(&h));
    let held = h.submit();
    drain(&mut rx);
    let w = drain_command(&mut h, "a", true).expect("drained");
    assert!(w.draining);
    assert!(told(&h), "the session's heartbeat replies say so");
    // And the session is told at once, by a reply that answers no heartbeat; once a change.
    let notices = |rx: &mut super::mailbox::Receiver<Outgoing>| -> Vec<bool> {
        drain(rx)
            .into_iter()
            .filter_map(|m| match m {
                CoordMsg::Heartbeat(r) if r.response_to.is_none() => Some(r.draining),
                _ => None,
            })
            .collect()
    };
    assert_eq!(w.leases.len(), 1, "what it holds stays");
    assert_eq!(saved_draining(&h, "a"), Some(true));
    assert_eq!(notices(&mut rx), [true]);
    drain_command(&mut h, "a", true).expect("drained again");
    assert_eq!(notices(&mut rx), [] as [bool; 0], "no change, no notice");
    assert!(matches!(
        drain_command(&mut h, "nobody", true),
        Err(crate::core::ApiError::NotFound(_))
    ));
    let waiting = h.submit();
    h.frame("a", s, result(1, &held, 1));
    assert_eq!(h.core.tasks[&held].status, TaskStatus::Completed);
    assert_eq!(h.core.tasks[&waiting].status, TaskStatus::Queued);
    assert!(
        !drain(&mut rx)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(_))),
        "no assignment to a drained worker"
    );
    // Its link drops and a new process of it registers: still drained.
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: s,
    });
    let (_s2, mut rx2) = h.connect_registering("a", |r| {
        r.slots = 2;
        r.boot_id = "b-new".into();
    });
    assert!(h.core.workers[&wid("a")].draining);
    assert!(told(&h), "a new session is told from its start");
    assert_eq!(h.core.tasks[&waiting].status, TaskStatus::Queued);
    drain(&mut rx2);
    drain_command(&mut h, "a", true).expect("drained again");
    assert_eq!(
        saved_draining(&h, "a"),
        None,
        "the same drain again saves nothing"
    );
    // Undrained: the queued task goes to it at once.
    let w = drain_command(&mut h, "a", false).expect("undrained");
    assert!(!w.draining);
    assert!(!told(&h));
    assert_eq!(saved_draining(&h, "a"), Some(false));
    assert_eq!(h.core.tasks[&waiting].status, TaskStatus::Running);
    let sent = drain(&mut rx2);
    assert!(
        sent.iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(a) if a.task_id == waiting))
    );
    assert!(
        sent.iter()
            .any(|m| matches!(m, CoordMsg::Heartbeat(r) if r.response_to.is_none() && !r.draining)),
        "told at once it is undrained: {sent:?}"
    );
}

/// Loaded from the store after a restart, a stopping process that comes back still takes
/// nothing new, and a process a newer one replaced is refused while the newer one is connected.
#[test]
fn a_restart_keeps_a_stopping_process_stopping_and_a_replaced_one_refused() {
    let mut loaded = Loaded::default();
    for (id, stopping) in [("a", true), ("b", false)] {
        let mut w = crate::model::Worker::new(wid(id), now());
        w.state = WorkerState::Disconnected;
        w.boot_id = "b".into();
        w.stopping = stopping;
        w.superseded = vec!["b-old".into()];
        loaded.workers.push(w);
    }
    let mut h = Harness::from_store(CoordinatorConfig::new("/nonexistent"), loaded);
    let t = h.submit();
    let (_s, mut rx) = h.connect_registering("a", |r| r.slots = 2);
    assert!(h.core.workers[&wid("a")].stopping);
    assert!(
        !drain(&mut rx)
            .iter()
            .any(|m| matches!(m, CoordMsg::TaskAssignment(_))),
        "no new task for the stopping process come back"
    );
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Queued);
    let (_s, _rx) = h.connect("b");
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Running);
    assert!(h.core.superseded_refusal(&wid("b"), "b-old").is_some());
}

/// Tasks that arrive one at a time (a dispatch each) spread over the idle workers: each
/// dispatch starts after the worker the last one leased to, not at the lowest id (which took
/// every task while the others idled).
#[test]
fn tasks_submitted_one_at_a_time_spread_over_idle_workers() {
    let mut h = Harness::new();
    let mut rxs = Vec::new();
    for w in ["a", "b", "c"] {
        rxs.push(h.connect_registering(w, |r| r.slots = 4).1);
    }
    let holders: Vec<String> = (0..6)
        .map(|_| {
            let t = h.submit();
            let lease = h.core.tasks[&t].lease.as_ref().expect("leased");
            lease.worker.to_string()
        })
        .collect();
    assert_eq!(holders, ["a", "b", "c", "a", "b", "c"]);
}

/// `worker_stopped` moves every task the worker still holds at once, recorded as `stopped`,
/// and they go to another worker without waiting for the grace period.
#[test]
fn a_stopped_worker_s_leases_move_at_once() {
    let mut h = Harness::new();
    let (s, _rx) = h.connect("a");
    let t = h.submit();
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Running);
    h.frame("a", s, WorkerMsg::WorkerStopping(stop_notice()));
    assert!(h.core.tasks[&t].lease.is_some());
    h.frame("a", s, WorkerMsg::WorkerStopped(stop_notice()));
    let task = &h.core.tasks[&t];
    assert_eq!(task.status, TaskStatus::Queued, "moved without the grace");
    assert!(task.lease.is_none());
    assert_eq!(task.attempts[0].end.as_deref(), Some("stopped"));
    assert!(h.core.workers[&wid("a")].leases.is_empty());
    let (_sb, _rxb) = h.connect("b");
    let task = &h.core.tasks[&t];
    assert_eq!(task.status, TaskStatus::Running);
    assert_eq!(
        task.lease.as_ref().map(|l| l.worker.clone()),
        Some(wid("b"))
    );
    // a's late result for the moved attempt is stale, never counted.
    h.frame("a", s, result(1, &t, 1));
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Running);
}

/// The pieces of a checkpoint whose announcement was refused (here: over the size limit) are
/// answered `rejected`, not `duplicate` (which says "stored already"); a replayed piece of a
/// checkpoint that completed stays `duplicate`.
#[test]
fn pieces_of_a_refused_checkpoint_are_rejected_and_replays_of_a_complete_one_duplicate() {
    let mut cfg = CoordinatorConfig::new("/nonexistent");
    cfg.max_checkpoint_bytes = 100;
    let mut h = Harness::with(cfg);
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    drain(&mut rx);
    h.frame("a", s, checkpoint(1, &t, "c-big", 101, 1));
    assert_eq!(checkpoint_ack(&drain(&mut rx)), Disposition::Rejected);
    h.frame("a", s, piece(2, &t, "c-big", 0, &[1; 101]));
    assert_eq!(data_ack(&drain(&mut rx)), Disposition::Rejected);
    h.frame("a", s, checkpoint(3, &t, "c-ok", 100, 1));
    assert_eq!(checkpoint_ack(&drain(&mut rx)), Disposition::Recorded);
    h.frame("a", s, piece(4, &t, "c-ok", 0, &[2; 100]));
    assert_eq!(data_ack(&drain(&mut rx)), Disposition::Recorded);
    // Acknowledgements lost with a session: the same piece again.
    h.frame("a", s, piece(4, &t, "c-ok", 0, &[2; 100]));
    assert_eq!(data_ack(&drain(&mut rx)), Disposition::Duplicate);
}

fn checkpoint_error(task: &TaskId, id: &str) -> WorkerMsg {
    WorkerMsg::CheckpointError(tether_proto::msg::CheckpointError {
        task_id: task.clone(),
        checkpoint_id: Some(tether_proto::CheckpointId::parse(id).expect("id")),
        error: "abandoned".into(),
        timestamp: now(),
    })
}

/// A `checkpoint_error` naming an unfinished upload drops it at once (its missing pieces will
/// not come), but only the uploading worker's word counts.
#[test]
fn a_checkpoint_the_worker_cannot_finish_is_dropped_at_its_word_only() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    drain(&mut rx);
    h.frame("a", s, checkpoint(1, &t, "c-1", 10, 2));
    h.frame("a", s, piece(2, &t, "c-1", 0, b"12345"));
    let c1 = tether_proto::CheckpointId::parse("c-1").expect("id");
    assert!(h.core.partial.get(&c1).is_some());
    let (sb, _rxb) = h.connect("b");
    h.frame("b", sb, checkpoint_error(&t, "c-1"));
    assert!(h.core.partial.get(&c1).is_some(), "another worker's word");
    h.frame("a", s, checkpoint_error(&t, "c-1"));
    assert!(h.core.partial.get(&c1).is_none());
    assert_eq!(deleted_checkpoints(&h.last_muts), ["c-1"]);
    // A piece still on its way finds nothing to complete.
    drain(&mut rx);
    h.frame("a", s, piece(3, &t, "c-1", 1, b"67890"));
    assert_eq!(data_ack(&drain(&mut rx)), Disposition::Rejected);
    assert!(h.core.tasks[&t].latest_checkpoint.is_none());
}

/// While a worker is connected, the sweep writes that the coordinator is alive every
/// `ALIVE_EVERY` (after a crash, the connected workers were last seen then); with none
/// connected it writes nothing.
#[tokio::test(start_paused = true)]
async fn the_sweep_says_the_coordinator_is_alive_every_few_seconds_while_a_worker_is_connected() {
    let mut h = Harness::new();
    let alive = |h: &mut Harness| {
        let mut b = Batch::default();
        h.core.sweep(&mut b);
        let alive = |m: &&crate::store::Mutation| matches!(m, crate::store::Mutation::AliveAt(_));
        b.muts.iter().filter(alive).count()
    };
    assert_eq!(alive(&mut h), 0, "no worker connected");
    let (s, _rx) = h.connect("a");
    assert_eq!(alive(&mut h), 1);
    assert_eq!(alive(&mut h), 0);
    tokio::time::advance(super::tasks::ALIVE_EVERY).await;
    assert_eq!(alive(&mut h), 1);
    tokio::time::advance(super::tasks::ALIVE_EVERY).await;
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: s,
    });
    assert_eq!(alive(&mut h), 0, "its disconnect saved it");
}

fn control(
    h: &mut Harness,
    t: &TaskId,
    op: super::ControlOp,
) -> Result<crate::model::Task, super::ApiError> {
    let (tx, mut reply) = tokio::sync::oneshot::channel();
    h.step(Event::Api(Api::Control {
        task: t.clone(),
        op,
        reply: tx,
    }));
    reply.try_recv().expect("reply")
}

fn assigned(msgs: &[CoordMsg], t: &TaskId) -> bool {
    msgs.iter()
        .any(|m| matches!(m, CoordMsg::TaskAssignment(a) if &a.task_id == t))
}

/// A pause is the user's, not the attempt's: a paused task whose worker is lost (or stops,
/// or dies) stays paused, out of the queue, and no other worker takes it until it is
/// resumed; a queued task can be paused (held) and resumed the same way.
#[test]
fn a_paused_task_stays_paused_when_its_lease_ends_and_runs_again_only_once_resumed() {
    use super::ControlOp::{Pause, Resume};
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    assert!(assigned(&drain(&mut rx), &t));
    assert_eq!(
        control(&mut h, &t, Pause).expect("paused").status,
        TaskStatus::Paused
    );
    let (_, mut other) = h.connect("b");
    drain(&mut other);
    h.lose("a", s, &t);
    let task = &h.core.tasks[&t];
    assert_eq!(
        (task.status, task.lease.is_none()),
        (TaskStatus::Paused, true)
    );
    assert!(h.core.queue.is_empty(), "held out of the queue");
    let mut b = Batch::default();
    h.core.dispatch(&mut b);
    for e in b.effects {
        e.run(&h.conn);
    }
    assert!(
        !assigned(&drain(&mut other), &t),
        "no worker takes a paused task"
    );
    // Resumed: queued, and taken by the worker that is there.
    assert_eq!(
        control(&mut h, &t, Resume).expect("resumed").status,
        TaskStatus::Queued
    );
    assert!(assigned(&drain(&mut other), &t));
    assert_eq!(h.core.tasks[&t].attempt, Attempt(2));
    // A queued task: held, then released.
    let (_, mut busy) = h.connect("c");
    drain(&mut busy);
    let q = h.submit();
    let later = h.submit();
    let got: Vec<CoordMsg> = drain(&mut busy);
    assert!(
        assigned(&got, &q) && !assigned(&got, &later),
        "c's one slot took q"
    );
    assert_eq!(
        control(&mut h, &later, Pause).expect("held").status,
        TaskStatus::Paused
    );
    assert!(h.core.queue.is_empty());
    assert_eq!(
        control(&mut h, &later, Resume).expect("released").status,
        TaskStatus::Queued
    );
    assert!(!h.core.queue.is_empty());
    // Cancelled while held: ended, nothing left queued.
    assert_eq!(
        control(&mut h, &later, Pause).expect("held").status,
        TaskStatus::Paused
    );
    let cancelled = control(&mut h, &later, super::ControlOp::Cancel).expect("cancelled");
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    assert!(h.core.queue.is_empty());
}

/// The holder's notices follow the user's pause and resume, never lead them: a late
/// `task_resumed` (answering a resume that a pause has since followed) neither shows the task
/// running nor lets it move to another worker when its own is lost; a late `task_paused` after a
/// resume does not hold it out of the queue.
#[test]
fn a_late_pause_or_resume_notice_does_not_overrule_the_users_last_word() {
    use super::ControlOp::{Pause, Resume};
    let notice = |t: &TaskId| tether_proto::msg::TaskNotice {
        seq: Seq(1),
        task_id: t.clone(),
        attempt: Attempt(1),
        timestamp: now(),
    };
    // Paused, resumed, paused again; then the notice of the resume comes.
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    assert!(assigned(&drain(&mut rx), &t));
    for op in [Pause, Resume, Pause] {
        control(&mut h, &t, op).expect("control");
    }
    h.frame("a", s, WorkerMsg::TaskResumed(notice(&t)));
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Paused);
    h.lose("a", s, &t);
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Paused, "held");
    assert!(h.core.queue.is_empty(), "held out of the queue");
    // Paused, then resumed; then the notice of the pause comes.
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    assert!(assigned(&drain(&mut rx), &t));
    control(&mut h, &t, Pause).expect("paused");
    control(&mut h, &t, Resume).expect("resumed");
    h.frame("a", s, WorkerMsg::TaskPaused(notice(&t)));
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Running);
    h.lose("a", s, &t);
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Queued, "queued again");
    // A notice that agrees is taken: the status shows the holder parked.
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    assert!(assigned(&drain(&mut rx), &t));
    h.frame("a", s, WorkerMsg::TaskPaused(notice(&t)));
    assert_eq!(
        h.core.tasks[&t].status,
        TaskStatus::Running,
        "no pause was asked"
    );
    control(&mut h, &t, Pause).expect("paused");
    h.frame("a", s, WorkerMsg::TaskPaused(notice(&t)));
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Paused);
}

/// What workers report is logged within a budget a second across all of them (a worker may
/// send thousands of `error` frames a second within its message rate); the rest is counted.
#[tokio::test(start_paused = true)]
async fn reports_from_workers_are_logged_within_a_budget_a_second() {
    let mut logs = super::PeerLogs::default();
    let admitted = (0..100).filter(|_| logs.admit()).count();
    assert_eq!(admitted, super::PEER_LOGS_PER_SEC as usize);
    assert_eq!(logs.dropped, 100 - u64::from(super::PEER_LOGS_PER_SEC));
    tokio::time::advance(std::time::Duration::from_secs(1)).await;
    assert!(logs.admit(), "a new second, a new budget");
    assert_eq!(logs.dropped, 0);
    // And a line shows a bounded part of the peer's text.
    let text = "S".repeat(1 << 20);
    let shown = format!("{:?}", tether_proto::msg::logged(&text));
    assert_eq!(shown.len(), tether_proto::msg::LOGGED_MESSAGE_CHARS + 2);
}

/// A failed result's error text may be as long as a frame; the task's record, in memory and
/// copied by every save, event and listing, keeps its first 4 KiB with a marker (cut on a
/// character boundary), while the stored result keeps it whole.
#[test]
fn a_failed_results_long_error_is_cut_in_the_tasks_record_and_kept_whole_in_the_result() {
    use super::messages::TASK_ERROR_BYTES;
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit();
    drain(&mut rx);
    // Two-byte characters after one byte: the bound falls inside a character.
    let message = format!("x{}", "é".repeat(4 << 20));
    let WorkerMsg::TaskResult(mut r) = result(1, &t, 1) else {
        unreachable!("a result")
    };
    r.outcome = Outcome::Failed;
    r.error = Some(tether_proto::task::TaskError {
        message: message.clone(),
        detail: None,
    });
    h.frame("a", s, WorkerMsg::TaskResult(r));
    assert_eq!(result_ack(&drain(&mut rx)), Disposition::Recorded);
    let task = &h.core.tasks[&t];
    assert_eq!(task.status, TaskStatus::Failed);
    let kept = task.error.as_deref().expect("an error");
    assert!(kept.len() <= TASK_ERROR_BYTES, "{} bytes", kept.len());
    assert!(kept.len() > TASK_ERROR_BYTES - 64, "{} bytes", kept.len());
    let cut = message.len() - kept.find('…').expect("a marker");
    assert!(kept.ends_with(&format!("… (cut: {cut} bytes)")), "{kept}");
    assert!(message.starts_with(&kept[..kept.find('…').expect("a marker")]));
    let stored = h
        .last_muts
        .iter()
        .find_map(|m| match m {
            crate::store::Mutation::PutResult { body, .. } => Some(body),
            _ => None,
        })
        .expect("the result stored");
    assert!(
        stored.len() > message.len(),
        "the stored result keeps it whole"
    );
    // Short text is kept as it came.
    assert_eq!(super::messages::kept_error("exit 1"), "exit 1");
}

/// The assignment of `task` among `sent`, if any.
fn assignment_of<'a>(sent: &'a [CoordMsg], task: &TaskId) -> Option<&'a TaskAssignment> {
    sent.iter().find_map(|m| match m {
        CoordMsg::TaskAssignment(a) if a.task_id == *task => Some(a),
        _ => None,
    })
}

/// A new process of worker `a` (boot `b-new`) registering with `task`'s attempt 1 lost with the
/// previous one, its outbox holding messages 5 and 6 unacknowledged, and 7 acknowledged (a
/// result, which goes before checkpoints).
fn registering_after_a_death(
    task: &TaskId,
    replay_through: Option<u64>,
) -> impl FnOnce(&mut Registration) + '_ {
    move |r: &mut Registration| {
        r.boot_id = "b-new".into();
        r.inventory.lost = vec![tether_proto::task::TaskRef {
            task_id: task.clone(),
            attempt: Attempt(1),
            paused: false,
        }];
        r.inventory.acked_seq = Seq(7);
        r.inventory.replay_through = replay_through.map(Seq);
    }
}

/// A task that died with its worker's process waits on its lease for the new process's replay
/// (`replay_through`): the checkpoint the dead process wrote, which no coordinator had
/// acknowledged, comes in it, and the next attempt resumes from it. Requeued at the
/// registration, as before, it was dispatched at once from the start, and the checkpoint
/// came stale (the e2e run's killed_work_resumed_from_checkpoints failed on it, seed 7).
#[test]
fn a_task_dead_with_its_workers_process_resumes_from_the_checkpoint_its_replay_brings() {
    let mut h = Harness::new();
    let (sa, mut rxa) = h.connect("a");
    let t = h.submit();
    assert!(assignment_of(&drain(&mut rxa), &t).is_some());
    h.step(Event::Disconnected {
        worker: wid("a"),
        session_id: sa,
    });
    let (sa2, mut rxa2) = h.connect_registering("a", registering_after_a_death(&t, Some(6)));
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Running, "held");
    assert!(assignment_of(&drain(&mut rxa2), &t).is_none());
    h.frame("a", sa2, checkpoint(5, &t, "c-dead", 1, 1));
    assert_eq!(
        h.core.tasks[&t].attempt,
        Attempt(1),
        "the replay is not through"
    );
    h.frame("a", sa2, piece(6, &t, "c-dead", 0, b"x"));
    let sent = drain(&mut rxa2);
    let again = assignment_of(&sent, &t).expect("dispatched again once the replay is through");
    assert_eq!(again.attempt, Attempt(2));
    // The assignment carries the task's latest checkpoint, read from the store after the
    // commit (which this harness has not): that checkpoint is the dead process's.
    let latest = h.core.tasks[&t].latest_checkpoint.as_ref().expect("latest");
    assert_eq!(
        (latest.checkpoint_id.as_str(), latest.attempt),
        ("c-dead", Attempt(1)),
        "resumed from the dead process's checkpoint"
    );
    assert!(h.core.held_dead.is_empty());
}

/// The hold ends however the replay does not come through: at the session's end (the task is
/// requeued at once, not left to the grace period), and at the deadline, the heartbeat
/// timeout, swept. Without a `replay_through`, an older worker's, it is requeued at the
/// registration.
#[test]
fn a_dead_task_held_for_a_replay_is_requeued_when_the_replay_does_not_come() {
    for ending in ["session end", "deadline", "no replay"] {
        let mut cfg = CoordinatorConfig::new("/nonexistent");
        cfg.heartbeat_timeout = std::time::Duration::ZERO;
        let mut h = Harness::with(cfg);
        let (sa, mut rxa) = h.connect("a");
        let t = h.submit();
        drain(&mut rxa);
        h.step(Event::Disconnected {
            worker: wid("a"),
            session_id: sa,
        });
        let through = (ending != "no replay").then_some(6);
        let (sa2, _rxa2) = h.connect_registering("a", registering_after_a_death(&t, through));
        match ending {
            "session end" => h.step(Event::Disconnected {
                worker: wid("a"),
                session_id: sa2,
            }),
            "deadline" => {
                assert_eq!(h.core.tasks[&t].attempt, Attempt(1), "held");
                let mut b = Batch::default();
                h.core.sweep(&mut b);
            }
            _ => {}
        }
        let task = &h.core.tasks[&t];
        assert!(
            task.attempts[0].end.as_deref() == Some("lost")
                && task.lease.as_ref().is_none_or(|l| l.attempt != Attempt(1)),
            "{ending}: {task:?}"
        );
        assert!(h.core.held_dead.is_empty(), "{ending}");
    }
}

/// A retry of a task (a spec whose `retry_of` names it) is recorded on that task, in the model
/// and in the store; a task has one retry, and only an ended task is retried: a second retry,
/// one of a task still queued, one of a task not there, or two of one task in a submission
/// are refused, and the refused submission makes nothing.
#[test]
fn a_task_is_retried_once_and_only_once_it_has_ended() {
    let mut h = Harness::new();
    let retry = |of: &TaskId| TaskSpec {
        retry_of: Some(of.clone()),
        ..TaskSpec::new("sleep", serde_json::json!({}))
    };
    let first = h.submit();
    let refused = |h: &mut Harness, specs: Vec<TaskSpec>| {
        let before = h.core.tasks.len();
        let e = h.try_submit(specs).expect_err("refused");
        assert_eq!(h.core.tasks.len(), before, "nothing made: {e}");
        e
    };
    let e = refused(&mut h, vec![retry(&first)]);
    assert!(
        matches!(&e, super::ApiError::Conflict(m) if m.contains("is queued")),
        "{e:?}"
    );
    let e = refused(&mut h, vec![retry(&TaskId::parse("gone").expect("id"))]);
    assert!(matches!(e, super::ApiError::Invalid(_)), "{e:?}");

    h.cancel(&first);
    let e = refused(&mut h, vec![retry(&first), retry(&first)]);
    assert!(
        matches!(&e, super::ApiError::Conflict(m) if m.contains("twice")),
        "{e:?}"
    );
    let second = h.submit_spec(retry(&first));
    assert_eq!(h.core.tasks[&first].retried_by, Some(second.clone()));
    assert!(
        h.last_muts.iter().any(|m| matches!(m,
            crate::store::Mutation::PutTask(t) if t.task_id == first && t.retried_by == Some(second.clone()))),
        "the retry is stored on the task it retries"
    );
    let e = refused(&mut h, vec![retry(&first)]);
    assert!(
        matches!(&e, super::ApiError::Conflict(m) if m.contains(&format!("retried already, by task {second}"))),
        "{e:?}"
    );
    // The retry is a task like any other: retried in its turn once it ended.
    h.cancel(&second);
    let third = h.submit_spec(retry(&second));
    assert_eq!(h.core.tasks[&second].retried_by, Some(third.clone()));
    assert_eq!(h.core.tasks[&third].retried_by, None);
    assert_eq!(h.core.tasks[&first].retried_by, Some(second));
}

/// A retry sent again under its own id with the same spec (an answer lost) is answered with
/// the task already there, not refused as a second retry; with another `retry_of` it is
/// another spec, refused.
#[test]
fn a_retry_sent_again_under_its_id_is_answered_with_the_task_there() {
    let mut h = Harness::new();
    let first = h.submit();
    let other = h.submit();
    h.cancel(&first);
    h.cancel(&other);
    let spec = TaskSpec {
        task_id: Some(TaskId::parse("again").expect("id")),
        retry_of: Some(first.clone()),
        ..TaskSpec::new("sleep", serde_json::json!({}))
    };
    let made = h.submit_spec(spec.clone());
    let again = h.try_submit(vec![spec.clone()]).expect("answered");
    assert_eq!(again.existing, vec![made.clone()]);
    assert_eq!(h.core.tasks[&first].retried_by, Some(made));
    let e = h
        .try_submit(vec![TaskSpec {
            retry_of: Some(other.clone()),
            ..spec
        }])
        .expect_err("another spec");
    assert!(
        matches!(&e, super::ApiError::Conflict(m) if m.contains("`retry_of` differs")),
        "{e:?}"
    );
    assert_eq!(h.core.tasks[&other].retried_by, None);
}

/// A task that retries on `failed` runs again after a reported failure while it has attempts
/// left: the attempt ends `failed`, its result kept and not counted, the next attempt leased
/// at once (the worker is not rested: the task failed, not it). The last attempt's failure is
/// the task's end, counted with its error. An end the spec does not name (`timed_out` here)
/// ends the task at once, as without `retry_on`.
#[test]
fn a_task_that_retries_on_failure_runs_again_until_its_last_attempt_fails() {
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let t = h.submit_spec(TaskSpec {
        retry_on: vec![tether_proto::RetryOn::Failed],
        max_attempts: Some(3),
        ..TaskSpec::new("sleep", serde_json::json!({}))
    });
    for attempt in 1..=3 {
        let msgs = drain(&mut rx);
        assert!(
            msgs.iter().any(
                |m| matches!(m, CoordMsg::TaskAssignment(a) if a.task_id == t && a.attempt == Attempt(attempt))
            ),
            "attempt {attempt} leased: {msgs:?}"
        );
        h.frame("a", s, faulty(u64::from(attempt), &t, attempt, false));
        assert!(
            h.last_muts.iter().any(|m| matches!(m,
                crate::store::Mutation::PutResult { attempt: a, stale, .. } if *a == Attempt(attempt) && *stale == (attempt < 3))),
            "attempt {attempt}'s result kept, counted only for the last"
        );
        let task = &h.core.tasks[&t];
        assert_eq!(
            task.attempts[attempt as usize - 1].end.as_deref(),
            Some("failed")
        );
        assert!(h.core.workers[&wid("a")].resting.is_none(), "not rested");
        if attempt < 3 {
            assert_ne!(task.status, TaskStatus::Failed, "attempt {attempt}");
            assert_eq!(task.outcome, None);
        }
    }
    let task = &h.core.tasks[&t];
    assert_eq!(task.status, TaskStatus::Failed);
    assert_eq!(task.outcome, Some(Outcome::Failed));
    assert!(
        task.error
            .as_deref()
            .is_some_and(|e| e.contains("Permission denied")),
        "the last attempt's error is the task's: {:?}",
        task.error
    );
    assert_eq!(Counters::get(&h.core.counters.results_recorded), 1);
    // Each stored result is counted once: the two that ran the task again apart.
    assert_eq!(Counters::get(&h.core.counters.results_retried), 2);
    // A retried attempt's result sent again (its frame replayed, or under a new number) is
    // answered as before or as a duplicate: no second retry, the end stands.
    h.frame("a", s, faulty(1, &t, 1, false));
    assert_eq!(result_ack(&drain(&mut rx)), Disposition::Recorded);
    h.frame("a", s, faulty(9, &t, 1, false));
    assert_eq!(result_ack(&drain(&mut rx)), Disposition::Duplicate);
    assert_eq!(Counters::get(&h.core.counters.results_retried), 2);
    assert_eq!(h.core.tasks[&t].attempts.len(), 3);
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Failed);

    let other = h.submit_spec(TaskSpec {
        retry_on: vec![tether_proto::RetryOn::Failed],
        ..TaskSpec::new("sleep", serde_json::json!({}))
    });
    drain(&mut rx);
    let WorkerMsg::TaskResult(mut r) = result(4, &other, 1) else {
        unreachable!()
    };
    r.outcome = Outcome::TimedOut;
    h.frame("a", s, WorkerMsg::TaskResult(r));
    assert_eq!(h.core.tasks[&other].status, TaskStatus::TimedOut);
    assert_eq!(h.core.tasks[&other].attempts.len(), 1);
}

/// A late result of a lost attempt that failed, of a task that retries on failure, is no end
/// of the task: the failure would have run it again, and its next attempt runs already. The
/// result is kept stale; the next attempt goes on and its end is the task's.
#[test]
fn a_late_failure_of_a_task_that_retries_on_failure_is_kept_stale_not_adopted() {
    let mut h = Harness::new();
    let (sa, mut rxa) = h.connect("a");
    let t = h.submit_spec(TaskSpec {
        retry_on: vec![tether_proto::RetryOn::Failed],
        ..TaskSpec::new("sleep", serde_json::json!({}))
    });
    drain(&mut rxa);
    h.lose("a", sa, &t);
    let (sb, mut rxb) = h.assigned("b", Attempt(2));
    let (sa2, mut rxa2) = h.connect("a");
    drain(&mut rxa2);
    h.frame("a", sa2, faulty(1, &t, 1, false));
    assert_eq!(result_ack(&drain(&mut rxa2)), Disposition::Stale);
    let task = &h.core.tasks[&t];
    assert_eq!(task.status, TaskStatus::Running);
    assert_eq!(task.lease.as_ref().map(|l| l.attempt), Some(Attempt(2)));
    assert_eq!(task.attempts[1].end, None, "the next attempt runs on");
    assert_eq!(Counters::get(&h.core.counters.results_adopted), 0);
    assert!(
        !drain(&mut rxb)
            .iter()
            .any(|m| matches!(m, CoordMsg::CancelTask(_))),
        "b is not told to stop"
    );
    h.frame("b", sb, result(1, &t, 2));
    assert_eq!(result_ack(&drain(&mut rxb)), Disposition::Recorded);
    assert_eq!(h.core.tasks[&t].status, TaskStatus::Completed);
}

/// A run is its name's tasks, each by its latest try: a failure retried to completion (under
/// the run's name or another) passes, a try not ended keeps the run running, one that did
/// not complete fails it; the runs are listed newest first, and one asked by name alone.
#[test]
fn a_run_is_judged_by_the_latest_try_of_each_of_its_tasks() {
    use super::{RunQuery, RunVerdict};
    let mut h = Harness::new();
    let (s, mut rx) = h.connect("a");
    let named = |name: Option<&str>, retry_of: Option<&TaskId>| TaskSpec {
        name: name.map(str::to_owned),
        retry_of: retry_of.cloned(),
        ..TaskSpec::new("sleep", serde_json::json!({}))
    };
    let mut seq = 0;
    // Runs `task`'s current attempt on `a` (its one slot) to `outcome`.
    let mut ends = |h: &mut Harness, task: &TaskId, outcome: Outcome| {
        let attempt = h.core.tasks[task].attempt.0;
        seq += 1;
        let WorkerMsg::TaskResult(mut r) = result(seq, task, attempt) else {
            unreachable!()
        };
        r.outcome = outcome;
        h.frame("a", s, WorkerMsg::TaskResult(r));
        drain(&mut rx);
        let record = h.core.tasks[task]
            .attempts
            .iter()
            .find(|a| a.attempt.0 == attempt);
        assert_eq!(
            record.and_then(|a| a.end.as_deref()),
            Some(TaskStatus::from(outcome).as_str()),
            "{task}"
        );
    };
    let run = |h: &Harness| {
        let mut runs = h.core.runs(&RunQuery {
            name: Some("nightly".into()),
            limit: 10,
        });
        assert_eq!(runs.len(), 1, "{runs:?}");
        runs.remove(0)
    };
    let t1 = h.submit_spec(named(Some("nightly"), None));
    ends(&mut h, &t1, Outcome::Completed);
    let t2 = h.submit_spec(named(Some("nightly"), None));
    ends(&mut h, &t2, Outcome::Failed);
    let t3 = h.submit_spec(named(Some("nightly"), None));
    // A task of no name is of no run.
    let unnamed = h.submit_spec(named(None, None));
    let r = run(&h);
    assert_eq!((r.tasks, r.retried, r.verdict), (3, 0, RunVerdict::Running));
    assert_eq!(
        r.by_status,
        [("completed", 1), ("failed", 1), ("running", 1)].into()
    );
    assert_eq!(r.finished_at, None);
    h.cancel(&t3);
    // Its worker stops it, and says so: the slot is free again.
    ends(&mut h, &t3, Outcome::Cancelled);
    ends(&mut h, &unnamed, Outcome::Completed);
    assert_eq!(run(&h).verdict, RunVerdict::Failed);
    assert!(run(&h).finished_at.is_some());

    // The failure retried under the run's name, the cancelled task under another: each
    // counted once, by its retry.
    let t4 = h.submit_spec(named(Some("nightly"), Some(&t2)));
    let r = run(&h);
    assert_eq!((r.tasks, r.retried, r.verdict), (3, 1, RunVerdict::Running));
    assert_eq!(r.flaky, 0, "not completed yet");
    ends(&mut h, &t4, Outcome::Completed);
    let t5 = h.submit_spec(named(Some("elsewhere"), Some(&t3)));
    ends(&mut h, &t5, Outcome::Completed);
    let r = run(&h);
    assert_eq!((r.tasks, r.retried, r.verdict), (3, 2, RunVerdict::Passed));
    assert_eq!(r.by_status, [("completed", 3)].into());
    // Completed after a failure: flaky; after a cancel, not.
    assert_eq!(r.flaky, 1);
    assert_eq!(r.finished_at, h.core.tasks[&t5].finished_at);
    assert_eq!(r.first_submitted_at, h.core.tasks[&t1].submitted_at);
    assert_eq!(r.last_submitted_at, h.core.tasks[&t4].submitted_at);

    // Newest first (by a run's latest submission); a name no task has is no run.
    let names =
        |q: RunQuery| -> Vec<String> { h.core.runs(&q).into_iter().map(|r| r.name).collect() };
    assert_eq!(
        names(RunQuery {
            name: None,
            limit: 10
        }),
        ["elsewhere", "nightly"]
    );
    assert_eq!(
        names(RunQuery {
            name: None,
            limit: 1
        }),
        ["elsewhere"]
    );
    assert!(
        names(RunQuery {
            name: Some("none".into()),
            limit: 10
        })
        .is_empty()
    );
    // The retry made under another name is a run of its own, of one task.
    let other = &h.core.runs(&RunQuery {
        name: Some("elsewhere".into()),
        limit: 1,
    })[0];
    assert_eq!(
        (other.tasks, other.retried, other.verdict),
        (1, 0, RunVerdict::Passed)
    );

    // A task run again on its failure (`retry_on`) that completed by its second attempt is
    // flaky too, with no retry: its first attempt failed.
    let flaky = h.submit_spec(TaskSpec {
        retry_on: vec![tether_proto::RetryOn::Failed],
        max_attempts: Some(2),
        ..named(Some("flaky"), None)
    });
    ends(&mut h, &flaky, Outcome::Failed);
    ends(&mut h, &flaky, Outcome::Completed);
    let r = &h.core.runs(&RunQuery {
        name: Some("flaky".into()),
        limit: 1,
    })[0];
    assert_eq!((r.retried, r.flaky, r.verdict), (0, 1, RunVerdict::Passed));
}
