//! An attempt's checkpoint pieces once its result is acknowledged (`Outbox::settle_attempt`),
//! over real sessions: the coordinator stores none of them any more (docs/PROTOCOL.md, section
//! 11), so the worker does not send them again, while another task's still go out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use tether_proto::msg::{CoordMsg, now};
use tether_proto::{Attempt, TaskId, WorkerId, WorkerMsg, decode_worker, encode};
use tether_worker::connector::{ConnectError, Connector, WsStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::fake::{Running, next_connection, piped, registration_ack, until_registration, welcome};

/// The task whose result is acknowledged while its checkpoint's pieces are still held.
const DONE: &str = "t-done";
/// The task still running, whose checkpoint's pieces must all arrive.
const RUNNING: &str = "t-running";
/// Bytes of each task's checkpoint, and of its pieces: four pieces each.
const CHECKPOINT: usize = 4096;
const PIECE: usize = 1024;
const PIECES: u32 = (CHECKPOINT / PIECE) as u32;

/// Writes a checkpoint, then returns at once: its result follows its pieces in the outbox.
struct CheckpointThenDone;

impl tether_worker::Executor for CheckpointThenDone {
    fn execute(
        &self,
        _input: tether_worker::TaskInput,
        ctx: tether_worker::TaskCtx,
    ) -> BoxFuture<'static, Result<serde_json::Value, tether_worker::ExecError>> {
        Box::pin(async move {
            ctx.checkpoint(vec![1u8; CHECKPOINT]).await;
            Ok(serde_json::json!("done"))
        })
    }
}

/// Writes a checkpoint, then runs until cancelled.
struct CheckpointThenWait;

impl tether_worker::Executor for CheckpointThenWait {
    fn execute(
        &self,
        _input: tether_worker::TaskInput,
        ctx: tether_worker::TaskCtx,
    ) -> BoxFuture<'static, Result<serde_json::Value, tether_worker::ExecError>> {
        Box::pin(async move {
            ctx.checkpoint(vec![2u8; CHECKPOINT]).await;
            ctx.cancelled().await;
            Err(tether_worker::ExecError::Cancelled)
        })
    }
}

/// A coordinator that, on its first connection, assigns [`DONE`] and [`RUNNING`] and
/// acknowledges everything but checkpoints' announcements and pieces (a link that carries
/// them slower than the result), until `close_first` ends that connection; on later
/// connections it acknowledges everything. Records every message with its connection.
#[derive(Clone, Default)]
struct Coordinator {
    connections: Arc<Mutex<usize>>,
    received: Arc<Mutex<Vec<(usize, WorkerMsg)>>>,
    close_first: CancellationToken,
}

impl Coordinator {
    /// The checkpoint messages of `task` received on connection `conn`: the announcement as
    /// `None`, each piece by its chunk.
    fn checkpoints_on(&self, conn: usize, task: &str) -> Vec<Option<u32>> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .filter(|(c, _)| *c == conn)
            .filter_map(|(_, m)| match m {
                WorkerMsg::Checkpoint(c) if c.task_id.as_str() == task => Some(None),
                WorkerMsg::CheckpointData(d) if d.task_id.as_str() == task => Some(Some(d.chunk)),
                _ => None,
            })
            .collect()
    }

    /// Whether `task`'s announcement and every piece arrived on connection `conn`.
    fn whole_on(&self, conn: usize, task: &str) -> bool {
        let got = self.checkpoints_on(conn, task);
        got.contains(&None) && (0..PIECES).all(|c| got.contains(&Some(c)))
    }

    /// Results of `task` received on connection `conn`.
    fn results_on(&self, conn: usize, task: &str) -> usize {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .filter(|(c, m)| {
                *c == conn && matches!(m, WorkerMsg::TaskResult(r) if r.task_id.as_str() == task)
            })
            .count()
    }
}

impl Connector for Coordinator {
    fn connect(
        &self,
        url: String,
        config: WebSocketConfig,
    ) -> BoxFuture<'static, Result<WsStream, ConnectError>> {
        let conn = next_connection(&self.connections);
        let coord = self.clone();
        piped(url, config, move |io| serve(coord, conn, io))
    }
}

fn assignment(task: &str, kind: &str) -> CoordMsg {
    CoordMsg::TaskAssignment(tether_proto::msg::TaskAssignment {
        task_id: TaskId::parse(task).expect("id"),
        attempt: Attempt(1),
        kind: kind.into(),
        config: serde_json::json!({}).into(),
        timeout_ms: None,
        checkpoint: None,
        attempt_base: None,
        submit_seq: None,
        timestamp: now(),
    })
}

/// The acknowledgement of `msg`, as a coordinator that recorded it sends it.
fn ack_of(msg: &WorkerMsg) -> Option<CoordMsg> {
    use tether_proto::WorkerMsg as W;
    let ack = tether_proto::msg::Ack {
        ack_seq: msg.seq()?,
        task_id: None,
        checkpoint_id: None,
        chunk: None,
        disposition: tether_proto::msg::Disposition::Recorded,
        reason: None,
        timestamp: now(),
    };
    Some(match msg {
        W::TaskResult(_) => CoordMsg::TaskResultAck(ack),
        W::TaskState(_) => CoordMsg::TaskStateAck(ack),
        W::Checkpoint(_) => CoordMsg::CheckpointAck(ack),
        W::CheckpointData(_) => CoordMsg::CheckpointDataAck(ack),
        W::TaskCancelled(_) => CoordMsg::TaskCancelledAck(ack),
        _ => CoordMsg::TelemetryAck(ack),
    })
}

async fn serve(coord: Coordinator, conn: usize, io: tokio::io::DuplexStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(io).await else {
        return;
    };
    let send = |m: CoordMsg| Message::text(encode(&m));
    let session = conn as u64 + 1;
    if ws.send(send(welcome(session, 5000, 15000))).await.is_err() {
        return;
    }
    until_registration(&mut ws).await;
    let ack = CoordMsg::RegistrationAck(registration_ack(session));
    if ws.send(send(ack)).await.is_err() {
        return;
    }
    if conn == 0 {
        for m in [
            assignment(DONE, "checkpoint_then_done"),
            assignment(RUNNING, "checkpoint_then_wait"),
        ] {
            if ws.send(send(m)).await.is_err() {
                return;
            }
        }
    }
    loop {
        let m = tokio::select! {
            () = coord.close_first.cancelled(), if conn == 0 => {
                let _ = ws.close(None).await;
                return;
            }
            m = ws.next() => m,
        };
        let Some(Ok(Message::Text(t))) = m else {
            match m {
                Some(Ok(_)) => continue,
                _ => return,
            }
        };
        let Ok(msg) = decode_worker(t.as_str()) else {
            continue;
        };
        let reply = match &msg {
            WorkerMsg::Heartbeat(h) => Some(CoordMsg::Heartbeat(
                tether_proto::msg::HeartbeatReply::answering(h.sequence),
            )),
            WorkerMsg::Checkpoint(_) | WorkerMsg::CheckpointData(_) if conn == 0 => None,
            m => ack_of(m),
        };
        coord.received.lock().expect("lock").push((conn, msg));
        if let Some(reply) = reply
            && ws.send(send(reply)).await.is_err()
        {
            return;
        }
    }
}

/// Waits (virtual time) until `done`, failing the test after two minutes.
async fn until(what: &str, done: impl Fn() -> bool) {
    crate::fake::until(what, Duration::from_secs(120), done).await
}

/// Two tasks each send a checkpoint the coordinator does not acknowledge; one's result is
/// acknowledged and the session then ends. The next session sends the running task's whole
/// checkpoint again, but nothing of the finished attempt's: the coordinator would answer
/// each of those `stale` and store none.
#[tokio::test(start_paused = true)]
async fn pieces_of_an_attempt_whose_result_was_acknowledged_are_not_sent_again() {
    let coord = Coordinator::default();
    let mut cfg = tether_worker::WorkerConfig::new(
        "ws://coordinator.invalid:1",
        WorkerId::parse("w").expect("id"),
    );
    cfg.slots = 2;
    cfg.checkpoint_chunk_size = PIECE;
    let mut executors = tether_worker::Executors::builtin();
    executors.register("checkpoint_then_done", CheckpointThenDone);
    executors.register("checkpoint_then_wait", CheckpointThenWait);
    let acked = Arc::new(AtomicBool::new(false));
    let seen = acked.clone();
    let agent = tether_worker::Agent::with_transport(cfg, executors, coord.clone())
        .expect("valid config")
        .on_ack(move |_, held| {
            // Called once the runner has handled the ack, the checkpoints settled with it.
            if let Some(WorkerMsg::TaskResult(r)) = held
                && r.task_id.as_str() == DONE
            {
                seen.store(true, Ordering::SeqCst);
            }
        });
    let running = Running::start_agent(agent);
    let outbox = running.handle.outbox.clone();
    until("the result acknowledged, both checkpoints sent", || {
        acked.load(Ordering::SeqCst) && coord.whole_on(0, DONE) && coord.whole_on(0, RUNNING)
    })
    .await;
    // Both checkpoints went out and were not acknowledged: without the settling, each would
    // be sent again in the next session.
    assert_eq!(
        *coord.connections.lock().expect("lock"),
        1,
        "one session so far"
    );
    coord.close_first.cancel();
    until(
        "the running task's checkpoint sent again and acknowledged",
        || {
            coord.whole_on(1, RUNNING)
                && !outbox.snapshot().iter().any(|(_, _, m)| {
                    matches!(
                        m.as_ref(),
                        WorkerMsg::Checkpoint(_) | WorkerMsg::CheckpointData(_)
                    )
                })
        },
    )
    .await;
    // Nothing of the finished attempt's checkpoint is held any more, so none of it can follow.
    assert_eq!(
        coord.checkpoints_on(1, DONE),
        [],
        "sent again after its result's ack"
    );
    assert_eq!(coord.results_on(1, DONE), 0, "its result was acknowledged");
    assert!(outbox.is_settled(&TaskId::parse(DONE).expect("id"), Attempt(1)));
    running.stop().await;
}
