//! A scripted coordinator on the far end of an in-memory pipe.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use tether_proto::msg::{CoordMsg, PROTOCOL_VERSION, RegistrationAck, Welcome, now};
use tether_proto::{WorkerId, decode_worker, encode};
use tether_worker::connector::{ConnectError, Connector, Io, WsStream, handshake};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// What the fake coordinator does with a connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Script {
    /// Connection refused.
    Refuse,
    /// HTTP 401 at upgrade.
    Unauthorized,
    /// The connection made, the upgrade request swallowed: no answer, no reset (a blackhole).
    Unanswered,
    /// Register the worker, then close at once.
    RegisterThenClose,
    /// Register the worker, then answer nothing and read nothing (a black hole).
    RegisterThenSilence,
    /// Register, answer heartbeats and acknowledge every message that has a sequence number.
    Healthy,
    /// Like `Healthy`, with frames of at most [`SMALL_FRAME`] bytes, announced in the
    /// `registration_ack`: a larger frame ends the connection (as a coordinator's close 1009
    /// does). Records every `task_result` in `results`.
    SmallFrames,
    /// Like `Healthy`, and on the first connection assigns [`REASSIGNED`] at attempt 2, a
    /// `sleep` task of ten minutes in ten steps, naming no checkpoint (the coordinator has
    /// none): as a coordinator hands a lost task back to the worker that lost it.
    Reassign,
    /// Like `Healthy`, but the answer to the first heartbeat asks for the heartbeat interval
    /// `interval_ms` and timeout `timeout_ms` (as a heartbeat budget does); with `silent`, the
    /// coordinator then answers and acknowledges nothing more (it still reads). Counts every
    /// heartbeat in `heartbeats`.
    Retune {
        interval_ms: u64,
        timeout_ms: Option<u64>,
        silent: bool,
    },
    /// Like `Healthy`, but no message is ever acknowledged: what the worker sends is lost on
    /// the way (a middlebox that swallows bytes), while heartbeats still come back.
    Unacknowledging,
    /// Like `Healthy`, but the welcome goes out only once the registration has arrived: a
    /// worker that waited for the welcome before registering would wait for ever.
    WelcomeAfterRegistration,
    /// Register, answer the first `slow` heartbeats [`SLOW_REPLY`] late and the next `prompt` at
    /// once, then fall silent like [`Script::RegisterThenSilence`].
    Recovering { slow: u32, prompt: u32 },
    /// Register and answer the first `prompt` heartbeats at once; then, for `stall_ms`, answer
    /// and acknowledge nothing while pinging the worker every [`KEEPALIVE`] (as a coordinator
    /// whose core is held up does), counting the heartbeats held in `heartbeats`; then send
    /// every answer held, in a burst, and answer at once from then on.
    Stall { prompt: u32, stall_ms: u64 },
    /// Register, acknowledge at once, and answer each heartbeat [`LATE_REPLY`] after it came:
    /// later than the next heartbeat, so each answer is to one before the latest.
    LateReplies,
    /// Register, send one sample of every coordinator message, then answer heartbeats.
    Conformance,
    /// Like `Conformance`, with batching agreed and the samples in one batch frame, an
    /// unknown message among them.
    BatchConformance,
    /// Batching agreed; assigns `TOGETHER` one-step `sleep` tasks in one batch frame, then
    /// records how many `task_state` messages each frame from the worker carries.
    AssignTogether,
    /// Assigns a one-step `sleep` task whose checkpoint is named without its bytes, and answers
    /// a `checkpoint_fetch` as a coordinator that does not know it (`error` `unknown_type`);
    /// acknowledges the rest like `Healthy` and records each result's outcome.
    UnknownFetch,
    /// Assigns a one-step `sleep` task and answers its result with a `checkpoint_piece` whose
    /// `ack_seq` is the result's (a confused coordinator), never with its ack; records the
    /// result's outcome and acknowledges the rest.
    PieceForResult,
    /// Like `PieceForResult`, with an `error` `bad_frame` that names the result's `seq` as
    /// `ref_seq` of a `checkpoint_fetch` (a confused or forged error) instead of the piece.
    ErrorForResult,
    /// Like `PieceForResult`, with a `task_state_ack` naming the result's `seq`, then an
    /// `acks` that covers it (only a `task_result_ack` acknowledges a result: a confused or
    /// forged frame) instead of the piece.
    AcksForResult,
    /// Like `UnknownFetch`, but answers the `checkpoint_fetch` with an `acks` that covers its
    /// `seq` (a confused or forged frame: a fetch is answered by its piece) and nothing more.
    AcksForFetch,
    /// Assigns one task of kind [`BIG_KIND`] ([`BigCheckpoint`]), acknowledges everything like
    /// `Healthy`, and once all the pieces of its checkpoint are in, asks for the checkpoint
    /// again (`checkpoint_request`, as `POST /tasks/{id}/checkpoint` does); records every
    /// `checkpoint_data` received in `pieces`.
    RequestCheckpoint,
    /// Assigns one [`BIG_KIND`] task of [`STALLED_CHECKPOINT`] bytes on the first connection
    /// and reads nothing for [`STALL`] while it still sends a frame every second (the worker's
    /// writes fill the pipe and wait, its reads go on); then, and on later connections, like
    /// `Healthy`, recording every `checkpoint_data` in `pieces`.
    StallReads,
    /// Answers every `checkpoint` announcement `rejected` (as a coordinator refuses one past
    /// its limits or from a stranger) and never acknowledges a `checkpoint_data`, recording
    /// each in `pieces`; acknowledges the rest like `Healthy`.
    RejectCheckpoint,
    /// On the first connection registers the worker, assigns [`STOPPING`] at attempt 1 (a
    /// [`LAST_KIND`] task) and closes; every later connection is refused: a coordinator that
    /// hands out a task and goes away.
    AssignThenGone,
    /// Like `Healthy`, and on the first connection assigns [`STOPPING`] at attempt 1 (a
    /// [`LAST_KIND`] task).
    AssignAndStay,
    /// Like `AssignAndStay`, but never acknowledges a `checkpoint_data` (recorded in
    /// `pieces`): a checkpoint's announcement is stored, its pieces never are (a link that
    /// carries them slower than the worker's stop lasts).
    AssignAndHoldPieces,
    /// A path of `ack_ms` and no bandwidth limit: acknowledges every message `ack_ms` after it
    /// came, without waiting to read the next (answers heartbeats at once); on the first
    /// connection assigns one [`BIG_KIND`] task of [`SLOW_ACKS_CHECKPOINT`] bytes, recording
    /// every `checkpoint_data` in `pieces`.
    SlowAcks { ack_ms: u64 },
    /// Registers the worker and acknowledges every message; records every `telemetry` in
    /// `telemetry`. On the first connection answers each heartbeat `first_ms` late, and closes
    /// once a `telemetry` with an RTT figure came; on the later ones (the path after a
    /// reconnect) answers each `then_ms` late.
    PathChange { first_ms: u64, then_ms: u64 },
    /// Like `Healthy`, and on the first connection assigns [`STOPPING`] at attempt 2, a
    /// [`RESUMES_KIND`] task, naming no checkpoint (the coordinator completed none): as a
    /// coordinator hands a task back to the worker that stopped it.
    ReassignStopping,
    /// Like `Reassign` on the first connection (a ten-minute task at attempt 2), then reads
    /// and writes nothing more, like `RegisterThenSilence`: a worker holding leased work whose
    /// path goes silent.
    ReassignThenSilence,
    /// Like `Healthy`, and on the first connection assigns a one-step `sleep` task; every
    /// `task_result` is acknowledged `stale` (kept, not counted: the attempt lost its lease),
    /// the ack giving `reason` (as an older coordinator, none when `None`).
    StaleResults { reason: Option<&'static str> },
    /// Like `Healthy`; on the first connection the first `beats` heartbeat replies say the
    /// worker is drained (`draining`), the later ones not, as an operator's drain and undrain.
    Drained { beats: u64 },
    /// Like `Healthy`, and on the first connection assigns a one-step `sleep` task; the first
    /// `task_result` is answered by an `error` `bad_frame` instead of its ack, as a coordinator
    /// does for a frame damaged on the wire (naming the result's `seq` when `named`: read far
    /// enough for that). Records every `task_result` in `results`, with when it came in
    /// `result_times`.
    DamagedResult { named: bool },
    /// The coordinator's TLS certificate is not trusted ([`ConnectError::Untrusted`]).
    Untrusted,
}

/// The task [`Script::AssignThenGone`] assigns.
pub const STOPPING: &str = "t-stopping";

/// The kind of [`LastCheckpoint`] tasks.
pub const LAST_KIND: &str = "last_checkpoint";

/// Waits until cancelled; told its worker stops, writes the checkpoint `b"last"` first (as a
/// `command` task's TERM trap does).
pub struct LastCheckpoint;

impl tether_worker::Executor for LastCheckpoint {
    fn execute(
        &self,
        _input: tether_worker::TaskInput,
        ctx: tether_worker::TaskCtx,
    ) -> BoxFuture<'static, Result<serde_json::Value, tether_worker::ExecError>> {
        Box::pin(async move {
            ctx.cancelled().await;
            if ctx.worker_stopping() {
                ctx.checkpoint(b"last".to_vec()).await;
            }
            Err(tether_worker::ExecError::Cancelled)
        })
    }
}

/// The kind of [`Resumes`] tasks.
pub const RESUMES_KIND: &str = "resumes";

/// Returns at once the checkpoint it was started with, as text (`null` without one).
pub struct Resumes;

impl tether_worker::Executor for Resumes {
    fn execute(
        &self,
        _input: tether_worker::TaskInput,
        ctx: tether_worker::TaskCtx,
    ) -> BoxFuture<'static, Result<serde_json::Value, tether_worker::ExecError>> {
        Box::pin(async move {
            let cp = ctx.latest_checkpoint();
            Ok(serde_json::json!(
                cp.map(|d| String::from_utf8_lossy(&d).into_owned())
            ))
        })
    }
}

/// The task [`Script::Reassign`] assigns.
pub const REASSIGNED: &str = "t-lost";

/// The frame limit of [`Script::SmallFrames`].
pub const SMALL_FRAME: usize = 64 * 1024;

/// How long [`Script::StallReads`] reads nothing: more than twice the worker's liveness
/// timeout (15 s), so that a write waits until the deadline even after a frame read in between
/// moved it.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(40);

/// Bytes of the checkpoint of [`Script::StallReads`]: pieces far larger than the pipe.
pub const STALLED_CHECKPOINT: usize = 2 << 20;

/// The kind of [`BigCheckpoint`] tasks.
pub const BIG_KIND: &str = "big_checkpoint";

/// Writes one checkpoint of `bytes` bytes (its config's `{"bytes": n}`), then waits until
/// cancelled.
pub struct BigCheckpoint;

impl tether_worker::Executor for BigCheckpoint {
    fn execute(
        &self,
        input: tether_worker::TaskInput,
        ctx: tether_worker::TaskCtx,
    ) -> BoxFuture<'static, Result<serde_json::Value, tether_worker::ExecError>> {
        Box::pin(async move {
            let bytes = input.config["bytes"].as_u64().unwrap_or(1) as usize;
            ctx.checkpoint(vec![7u8; bytes]).await;
            ctx.cancelled().await;
            Err(tether_worker::ExecError::Cancelled)
        })
    }
}

/// Sequence numbers a fake coordinator received, each with its connection's index.
pub type Received = Arc<Mutex<Vec<(usize, u64)>>>;

/// How late [`Script::Recovering`] answers its slow heartbeats.
pub const SLOW_REPLY: std::time::Duration = std::time::Duration::from_secs(4);

/// How late [`Script::LateReplies`] answers every heartbeat.
pub const LATE_REPLY: std::time::Duration = std::time::Duration::from_millis(7_300);

/// How often [`Script::Stall`] pings while it answers nothing (the coordinator's
/// `KEEPALIVE_EVERY`, for a worker whose registration states no timeout; one that states it,
/// as this worker does, is pinged a third of it apart at most: see `ack_wait`).
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_millis(250);

/// Tasks assigned at once by [`Script::AssignTogether`].
pub const TOGETHER: usize = 8;

#[derive(Clone)]
pub struct FakeConnector {
    pub script: Arc<Mutex<Script>>,
    pub attempts: Arc<Mutex<Vec<Instant>>>,
    /// The URL of each attempt.
    pub urls: Arc<Mutex<Vec<String>>>,
    /// `task_state` messages in each frame that carried any ([`Script::AssignTogether`]).
    pub states_per_frame: Arc<Mutex<Vec<usize>>>,
    /// Sequence numbers received, with the connection (attempt index) that carried each.
    pub received: Received,
    /// The outcome of each `task_result` received ([`Script::UnknownFetch`]).
    pub outcomes: Arc<Mutex<Vec<tether_proto::Outcome>>>,
    /// Each `checkpoint_data` received, by checkpoint id and chunk
    /// ([`Script::RequestCheckpoint`]).
    pub pieces: Arc<Mutex<Vec<(String, u32)>>>,
    /// Each `task_result` received ([`Script::SmallFrames`]).
    pub results: Arc<Mutex<Vec<tether_proto::msg::TaskResult>>>,
    /// Heartbeats received, over all connections ([`Script::Retune`]).
    pub heartbeats: Arc<std::sync::atomic::AtomicU64>,
    /// Each `checkpoint_error` received ([`Script::SmallFrames`]).
    pub checkpoint_errors: Arc<Mutex<Vec<tether_proto::msg::CheckpointError>>>,
    /// `worker_stopped` notices received, over all connections (the scripts like `Healthy`).
    pub stopped: Arc<std::sync::atomic::AtomicUsize>,
    /// Each `telemetry` received, with its connection and when it came
    /// ([`Script::PathChange`]).
    pub telemetry: Telemetry,
    /// The `lost_after_ms` of every `registration_ack` (none: not said).
    pub lost_after_ms: Arc<Mutex<Option<u64>>>,
    /// When each `task_result` came ([`Script::DamagedResult`]), and when the `bad_frame` went.
    pub result_times: Arc<Mutex<Vec<Instant>>>,
    pub damaged_at: Arc<Mutex<Option<Instant>>>,
}

/// The `telemetry` a fake coordinator received: the connection, when, the statistics.
pub type Telemetry = Arc<Mutex<Vec<(usize, Instant, tether_proto::task::ConnStats)>>>;

impl FakeConnector {
    pub fn new(script: Script) -> Self {
        Self {
            script: Arc::new(Mutex::new(script)),
            attempts: Arc::default(),
            urls: Arc::default(),
            states_per_frame: Arc::default(),
            received: Arc::default(),
            outcomes: Arc::default(),
            pieces: Arc::default(),
            results: Arc::default(),
            heartbeats: Arc::default(),
            checkpoint_errors: Arc::default(),
            stopped: Arc::default(),
            telemetry: Arc::default(),
            lost_after_ms: Arc::default(),
            result_times: Arc::default(),
            damaged_at: Arc::default(),
        }
    }

    /// The `lost_after_ms` the `registration_ack`s say from now on.
    pub fn set_lost_after(&self, ms: Option<u64>) {
        *self.lost_after_ms.lock().expect("lock") = ms;
    }

    /// How many `worker_stopped` notices came.
    pub fn stopped(&self) -> usize {
        self.stopped.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The sequence numbers received on connection `conn` (the attempt's index).
    pub fn received_on(&self, conn: usize) -> Vec<u64> {
        let r = self.received.lock().expect("lock");
        r.iter()
            .filter(|(c, _)| *c == conn)
            .map(|&(_, s)| s)
            .collect()
    }

    pub fn attempts(&self) -> Vec<Instant> {
        self.attempts.lock().expect("lock").clone()
    }

    pub fn set(&self, s: Script) {
        *self.script.lock().expect("lock") = s;
    }
}

impl Connector for FakeConnector {
    fn connect(
        &self,
        url: String,
        config: WebSocketConfig,
    ) -> BoxFuture<'static, Result<WsStream, ConnectError>> {
        let conn = {
            let mut a = self.attempts.lock().expect("lock");
            a.push(Instant::now());
            a.len() - 1
        };
        self.urls.lock().expect("lock").push(url.clone());
        let script = *self.script.lock().expect("lock");
        let states = self.states_per_frame.clone();
        let received = self.received.clone();
        let outcomes = self.outcomes.clone();
        let pieces = self.pieces.clone();
        let results = self.results.clone();
        let heartbeats = self.heartbeats.clone();
        let checkpoint_errors = self.checkpoint_errors.clone();
        let stopped = self.stopped.clone();
        let telemetry = self.telemetry.clone();
        let lost_after_ms = *self.lost_after_ms.lock().expect("lock");
        let (result_times, damaged_at) = (self.result_times.clone(), self.damaged_at.clone());
        Box::pin(async move {
            match script {
                Script::Refuse => return Err(ConnectError::Transient("connection refused".into())),
                Script::AssignThenGone if conn > 0 => {
                    return Err(ConnectError::Transient("connection refused".into()));
                }
                Script::Unauthorized => {
                    return Err(ConnectError::Refused("HTTP 401 at upgrade".into()));
                }
                Script::Unanswered => std::future::pending().await,
                Script::Untrusted => {
                    return Err(ConnectError::Untrusted(
                        "TLS with coordinator.invalid:1: invalid peer certificate: UnknownIssuer"
                            .into(),
                    ));
                }
                _ => {}
            }
            let (client, server) = tokio::io::duplex(1 << 16);
            let seen = Seen {
                states,
                received: (conn, received),
                outcomes,
                pieces,
                results,
                heartbeats,
                checkpoint_errors,
                stopped,
                telemetry,
                lost_after_ms,
                result_times,
                damaged_at,
            };
            tokio::spawn(serve(server, script, seen));
            let io: Pin<Box<dyn Io>> = Box::pin(client);
            handshake(url, io, config).await
        })
    }
}

/// What a connection of the fake coordinator records.
struct Seen {
    states: Arc<Mutex<Vec<usize>>>,
    received: (usize, Received),
    outcomes: Arc<Mutex<Vec<tether_proto::Outcome>>>,
    pieces: Arc<Mutex<Vec<(String, u32)>>>,
    results: Arc<Mutex<Vec<tether_proto::msg::TaskResult>>>,
    heartbeats: Arc<std::sync::atomic::AtomicU64>,
    checkpoint_errors: Arc<Mutex<Vec<tether_proto::msg::CheckpointError>>>,
    stopped: Arc<std::sync::atomic::AtomicUsize>,
    telemetry: Telemetry,
    lost_after_ms: Option<u64>,
    result_times: Arc<Mutex<Vec<Instant>>>,
    damaged_at: Arc<Mutex<Option<Instant>>>,
}

async fn serve(io: tokio::io::DuplexStream, script: Script, seen: Seen) {
    let Seen {
        states: states_per_frame,
        received: (conn, received),
        outcomes,
        pieces,
        results,
        heartbeats,
        checkpoint_errors,
        stopped,
        telemetry,
        lost_after_ms,
        result_times,
        damaged_at,
    } = seen;
    let limit =
        (script == Script::SmallFrames).then(|| tether_worker::connector::ws_config(SMALL_FRAME));
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(io, limit).await else {
        return;
    };
    let send = |m: CoordMsg| Message::text(encode(&m));
    let welcome = send(welcome(1, 5000, 15000));
    let late = script == Script::WelcomeAfterRegistration;
    if !late {
        let _ = ws.send(welcome.clone()).await;
    }
    until_registration(&mut ws).await;
    if late {
        let _ = ws.send(welcome).await;
    }
    let _ = ws
        .send(send(CoordMsg::RegistrationAck(RegistrationAck {
            batching: matches!(script, Script::BatchConformance | Script::AssignTogether)
                .then_some(tether_proto::msg::Batching {
                    max_messages: 256,
                    max_bytes: 65_536,
                }),
            max_frame: (script == Script::SmallFrames).then_some(SMALL_FRAME as u64),
            lost_after_ms,
            ..registration_ack(1)
        })))
        .await;
    match script {
        Script::RegisterThenClose => {
            let _ = ws.close(None).await;
        }
        Script::AssignThenGone => {
            let _ = ws.send(send(last_assignment())).await;
            let _ = ws.close(None).await;
        }
        Script::RegisterThenSilence => {
            // Hold the connection open and never read or write again.
            std::future::pending::<()>().await;
        }
        Script::ReassignThenSilence => {
            let _ = ws.send(send(reassignment())).await;
            std::future::pending::<()>().await;
        }
        Script::StaleResults { .. } | Script::DamagedResult { .. } => {
            if conn == 0 {
                let _ = ws.send(send(one_step())).await;
            }
            let mut damaged = false;
            while let Some(Ok(m)) = ws.next().await {
                if let Some(seq) = heartbeat_in(&m)
                    && ws.send(heartbeat_reply(seq)).await.is_err()
                {
                    break;
                }
                let Some((seq, mut ack)) = ack_of(&m) else {
                    continue;
                };
                let result = matches!(ack, CoordMsg::TaskResultAck(_));
                if result {
                    result_times.lock().expect("lock").push(Instant::now());
                }
                let reply = match script {
                    Script::StaleResults { reason } if result => {
                        if let CoordMsg::TaskResultAck(a) = &mut ack {
                            a.disposition = tether_proto::msg::Disposition::Stale;
                            a.reason = reason.map(str::to_owned);
                        }
                        ack
                    }
                    Script::DamagedResult { named } if result && !damaged => {
                        damaged = true;
                        *damaged_at.lock().expect("lock") = Some(Instant::now());
                        CoordMsg::error(
                            tether_proto::msg::ErrorCode::BadFrame,
                            "compressed frame is not valid zstd: Data corruption detected",
                            named.then(|| "task_result".to_owned()),
                            named.then_some(seq),
                        )
                    }
                    _ => ack,
                };
                received.lock().expect("lock").push((conn, seq));
                if ws.send(send(reply)).await.is_err() {
                    break;
                }
            }
        }
        Script::Drained { beats } => {
            let mut answered = 0;
            while let Some(Ok(m)) = ws.next().await {
                let reply = match (heartbeat_in(&m), ack_of(&m)) {
                    (Some(seq), _) => {
                        let mut reply = tether_proto::msg::HeartbeatReply::answering(seq);
                        reply.draining = conn == 0 && answered < beats;
                        answered += 1;
                        CoordMsg::Heartbeat(reply)
                    }
                    (None, Some((_, ack))) => ack,
                    (None, None) => continue,
                };
                if ws.send(send(reply)).await.is_err() {
                    break;
                }
            }
        }
        Script::AssignTogether => {
            let mut batch = tether_proto::Batch::new();
            for _ in 0..TOGETHER {
                batch.push(&CoordMsg::TaskAssignment(
                    tether_proto::msg::TaskAssignment {
                        task_id: tether_proto::TaskId::fresh(),
                        attempt: tether_proto::Attempt(1),
                        kind: "sleep".into(),
                        config: serde_json::json!({"ms": 0, "steps": 1}).into(),
                        timeout_ms: None,
                        checkpoint: None,
                        attempt_base: None,
                        submit_seq: None,
                        timestamp: now(),
                    },
                ));
            }
            let _ = ws.send(Message::text(batch.take())).await;
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Text(t) = m {
                    let states = t.as_str().matches(r#""type":"task_state""#).count();
                    if states > 0 {
                        states_per_frame.lock().expect("lock").push(states);
                    }
                }
            }
        }
        Script::Healthy
        | Script::SmallFrames
        | Script::Reassign
        | Script::AssignAndStay
        | Script::AssignAndHoldPieces
        | Script::ReassignStopping
        | Script::Unacknowledging
        | Script::WelcomeAfterRegistration
        | Script::Conformance
        | Script::BatchConformance => {
            if script == Script::Reassign && conn == 0 {
                let assignment = CoordMsg::TaskAssignment(tether_proto::msg::TaskAssignment {
                    task_id: tether_proto::TaskId::parse(REASSIGNED).expect("id"),
                    attempt: tether_proto::Attempt(2),
                    kind: "sleep".into(),
                    config: serde_json::json!({"ms": 600_000, "steps": 10}).into(),
                    timeout_ms: None,
                    checkpoint: None,
                    attempt_base: None,
                    submit_seq: None,
                    timestamp: now(),
                });
                let _ = ws.send(send(assignment)).await;
            }
            if matches!(script, Script::AssignAndStay | Script::AssignAndHoldPieces) && conn == 0 {
                let _ = ws.send(send(last_assignment())).await;
            }
            if script == Script::ReassignStopping && conn == 0 {
                let assignment = CoordMsg::TaskAssignment(tether_proto::msg::TaskAssignment {
                    task_id: tether_proto::TaskId::parse(STOPPING).expect("id"),
                    attempt: tether_proto::Attempt(2),
                    kind: RESUMES_KIND.into(),
                    config: serde_json::json!({}).into(),
                    timeout_ms: None,
                    checkpoint: None,
                    attempt_base: None,
                    submit_seq: None,
                    timestamp: now(),
                });
                let _ = ws.send(send(assignment)).await;
            }
            if script == Script::Conformance {
                for m in tether_proto::samples::coord_messages() {
                    let _ = ws.send(send(m)).await;
                }
            }
            if script == Script::BatchConformance {
                let mut batch = tether_proto::Batch::new();
                for (i, m) in tether_proto::samples::coord_messages().iter().enumerate() {
                    batch.push(m);
                    if i == 3 {
                        batch.push(&serde_json::json!({"type": "bogus", "seq": 5}));
                    }
                }
                let _ = ws.send(Message::text(batch.take())).await;
            }
            while let Some(Ok(m)) = ws.next().await {
                if let Some(seq) = heartbeat_in(&m)
                    && ws.send(heartbeat_reply(seq)).await.is_err()
                {
                    break;
                }
                if let Message::Text(t) = &m {
                    match decode_worker(t.as_str()) {
                        Ok(tether_proto::WorkerMsg::TaskResult(r)) => {
                            results.lock().expect("lock").push(r);
                        }
                        Ok(tether_proto::WorkerMsg::CheckpointError(e)) => {
                            checkpoint_errors.lock().expect("lock").push(e);
                        }
                        Ok(tether_proto::WorkerMsg::WorkerStopped(_)) => {
                            stopped.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Ok(tether_proto::WorkerMsg::CheckpointData(d))
                            if script == Script::AssignAndHoldPieces =>
                        {
                            pieces
                                .lock()
                                .expect("lock")
                                .push((d.checkpoint_id.to_string(), d.chunk));
                            continue;
                        }
                        _ => {}
                    }
                }
                let Some((seq, ack)) = ack_of(&m) else {
                    continue;
                };
                received.lock().expect("lock").push((conn, seq));
                if script != Script::Unacknowledging && ws.send(send(ack)).await.is_err() {
                    break;
                }
            }
        }
        Script::PathChange { first_ms, then_ms } => {
            let delay =
                std::time::Duration::from_millis(if conn == 0 { first_ms } else { then_ms });
            while let Some(Ok(m)) = ws.next().await {
                if let Some(seq) = heartbeat_in(&m) {
                    tokio::time::sleep(delay).await;
                    if ws.send(heartbeat_reply(seq)).await.is_err() {
                        return;
                    }
                    continue;
                }
                let mut measured = false;
                if let Message::Text(t) = &m
                    && let Ok(tether_proto::WorkerMsg::Telemetry(t)) = decode_worker(t.as_str())
                {
                    measured = t.connection_stats.rtt_samples > 0;
                    let at = Instant::now();
                    let stats = t.connection_stats;
                    telemetry.lock().expect("lock").push((conn, at, stats));
                }
                if let Some((_, ack)) = ack_of(&m)
                    && ws.send(send(ack)).await.is_err()
                {
                    return;
                }
                if conn == 0 && measured {
                    let _ = ws.close(None).await;
                    return;
                }
            }
        }
        Script::Retune {
            interval_ms,
            timeout_ms,
            silent,
        } => {
            let mut told = false;
            while let Some(Ok(m)) = ws.next().await {
                let reply = match heartbeat_in(&m) {
                    Some(seq) => {
                        heartbeats.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let mut reply = tether_proto::msg::HeartbeatReply::answering(seq);
                        if !told {
                            reply.heartbeat_interval_ms = Some(interval_ms);
                            reply.heartbeat_timeout_ms = timeout_ms;
                        }
                        Some(CoordMsg::Heartbeat(reply))
                    }
                    None => ack_of(&m).map(|(_, ack)| ack),
                };
                if told && silent {
                    continue;
                }
                if let Some(reply) = reply {
                    let retuning = matches!(&reply, CoordMsg::Heartbeat(_));
                    if ws.send(send(reply)).await.is_err() {
                        return;
                    }
                    told |= retuning;
                }
            }
        }
        Script::Recovering { slow, prompt } => {
            let mut answered = 0;
            while answered < slow + prompt
                && let Some(Ok(m)) = ws.next().await
            {
                let Some(seq) = heartbeat_in(&m) else {
                    // What it records it acknowledges at once; only its heartbeats are slow.
                    if let Some((seq, ack)) = ack_of(&m) {
                        received.lock().expect("lock").push((conn, seq));
                        if ws.send(send(ack)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                };
                if answered < slow {
                    tokio::time::sleep(SLOW_REPLY).await;
                }
                if ws.send(heartbeat_reply(seq)).await.is_err() {
                    return;
                }
                answered += 1;
            }
            std::future::pending::<()>().await;
        }
        Script::Stall { prompt, stall_ms } => {
            // What a coordinator sends in answer to a frame: a heartbeat's reply or an ack.
            let answer = |m: &Message| match heartbeat_in(m) {
                Some(seq) => Some(heartbeat_reply(seq)),
                None => ack_of(m).map(|(_, ack)| send(ack)),
            };
            let mut answered = 0;
            while answered < prompt
                && let Some(Ok(m)) = ws.next().await
            {
                answered += u32::from(heartbeat_in(&m).is_some());
                if let Some(a) = answer(&m)
                    && ws.send(a).await.is_err()
                {
                    return;
                }
            }
            let until = Instant::now() + std::time::Duration::from_millis(stall_ms);
            let mut ping = tokio::time::interval_at(Instant::now() + KEEPALIVE, KEEPALIVE);
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => break,
                    _ = ping.tick() => {
                        if ws.send(Message::Ping(Default::default())).await.is_err() {
                            return;
                        }
                    }
                    m = ws.next() => {
                        let Some(Ok(m)) = m else { return };
                        if heartbeat_in(&m).is_some() {
                            heartbeats.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        held.extend(answer(&m));
                    }
                }
            }
            for a in held {
                if ws.send(a).await.is_err() {
                    return;
                }
            }
            while let Some(Ok(m)) = ws.next().await {
                if let Some(a) = answer(&m)
                    && ws.send(a).await.is_err()
                {
                    return;
                }
            }
        }
        Script::LateReplies => {
            let mut due: std::collections::VecDeque<(Instant, u64)> =
                std::collections::VecDeque::new();
            loop {
                tokio::select! {
                    () = first_due(&due) => {
                        let Some((_, seq)) = due.pop_front() else { continue };
                        if ws.send(heartbeat_reply(seq)).await.is_err() {
                            return;
                        }
                    }
                    m = ws.next() => {
                        let Some(Ok(m)) = m else { return };
                        if let Some(seq) = heartbeat_in(&m) {
                            due.push_back((Instant::now() + LATE_REPLY, seq));
                        } else if let Some((seq, ack)) = ack_of(&m) {
                            received.lock().expect("lock").push((conn, seq));
                            if ws.send(send(ack)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
        Script::SlowAcks { ack_ms } => {
            if conn == 0 {
                let assignment = CoordMsg::TaskAssignment(tether_proto::msg::TaskAssignment {
                    task_id: tether_proto::TaskId::parse("t-big").expect("id"),
                    attempt: tether_proto::Attempt(1),
                    kind: BIG_KIND.into(),
                    config: serde_json::json!({ "bytes": SLOW_ACKS_CHECKPOINT }).into(),
                    timeout_ms: None,
                    checkpoint: None,
                    attempt_base: None,
                    submit_seq: None,
                    timestamp: now(),
                });
                if ws.send(send(assignment)).await.is_err() {
                    return;
                }
            }
            let delay = std::time::Duration::from_millis(ack_ms);
            let mut due: std::collections::VecDeque<(Instant, CoordMsg)> =
                std::collections::VecDeque::new();
            loop {
                tokio::select! {
                    () = first_due(&due) => {
                        let Some((_, ack)) = due.pop_front() else { continue };
                        if ws.send(send(ack)).await.is_err() {
                            return;
                        }
                    }
                    m = ws.next() => {
                        let Some(Ok(m)) = m else { return };
                        if let Some(seq) = heartbeat_in(&m) {
                            if ws.send(heartbeat_reply(seq)).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        if let Message::Text(t) = &m
                            && let Ok(tether_proto::WorkerMsg::CheckpointData(d)) =
                                decode_worker(t.as_str())
                        {
                            pieces
                                .lock()
                                .expect("lock")
                                .push((d.checkpoint_id.to_string(), d.chunk));
                        }
                        if let Some((_, ack)) = ack_of(&m) {
                            due.push_back((Instant::now() + delay, ack));
                        }
                    }
                }
            }
        }
        Script::RejectCheckpoint => {
            while let Some(Ok(m)) = ws.next().await {
                if let Some(seq) = heartbeat_in(&m) {
                    if ws.send(heartbeat_reply(seq)).await.is_err() {
                        return;
                    }
                    continue;
                }
                let reply = match &m {
                    Message::Text(t) => match decode_worker(t.as_str()) {
                        Ok(tether_proto::WorkerMsg::CheckpointData(d)) => {
                            pieces
                                .lock()
                                .expect("lock")
                                .push((d.checkpoint_id.to_string(), d.chunk));
                            None
                        }
                        Ok(tether_proto::WorkerMsg::Checkpoint(c)) => {
                            Some(CoordMsg::CheckpointAck(tether_proto::msg::Ack {
                                ack_seq: c.seq,
                                task_id: Some(c.task_id),
                                checkpoint_id: Some(c.checkpoint_id),
                                chunk: None,
                                disposition: tether_proto::msg::Disposition::Rejected,
                                reason: None,
                                timestamp: now(),
                            }))
                        }
                        _ => ack_of(&m).map(|(_, ack)| ack),
                    },
                    _ => None,
                };
                if let Some(r) = reply
                    && ws.send(send(r)).await.is_err()
                {
                    return;
                }
            }
        }
        Script::UnknownFetch
        | Script::PieceForResult
        | Script::ErrorForResult
        | Script::AcksForResult
        | Script::AcksForFetch => {
            let fetching = matches!(script, Script::UnknownFetch | Script::AcksForFetch);
            let named = fetching.then(|| tether_proto::msg::CheckpointBlob {
                checkpoint_id: tether_proto::CheckpointId::parse("c-1").expect("id"),
                attempt: tether_proto::Attempt(1),
                data: None,
                size: Some(1_000_000),
            });
            let assignment = CoordMsg::TaskAssignment(tether_proto::msg::TaskAssignment {
                task_id: tether_proto::TaskId::parse("t-1").expect("id"),
                attempt: tether_proto::Attempt(2),
                kind: "sleep".into(),
                config: serde_json::json!({"ms": 0, "steps": 1}).into(),
                timeout_ms: None,
                checkpoint: named,
                attempt_base: None,
                submit_seq: None,
                timestamp: now(),
            });
            if conn == 0 && ws.send(send(assignment)).await.is_err() {
                return;
            }
            while let Some(Ok(m)) = ws.next().await {
                let reply = match &m {
                    Message::Text(t) => match decode_worker(t.as_str()) {
                        Ok(tether_proto::WorkerMsg::CheckpointFetch(f))
                            if script == Script::AcksForFetch =>
                        {
                            Some(CoordMsg::Acks(tether_proto::msg::Acks {
                                recorded: vec![(f.seq, f.seq)],
                                timestamp: now(),
                            }))
                        }
                        Ok(tether_proto::WorkerMsg::CheckpointFetch(f)) => Some(CoordMsg::error(
                            tether_proto::msg::ErrorCode::UnknownType,
                            "frame has unknown message type \"checkpoint_fetch\"",
                            Some("checkpoint_fetch".into()),
                            Some(f.seq.0),
                        )),
                        Ok(tether_proto::WorkerMsg::TaskResult(r)) => {
                            outcomes.lock().expect("lock").push(r.outcome);
                            if script == Script::ErrorForResult {
                                Some(CoordMsg::error(
                                    tether_proto::msg::ErrorCode::BadFrame,
                                    "undecodable checkpoint_fetch",
                                    Some("checkpoint_fetch".into()),
                                    Some(r.seq.0),
                                ))
                            } else if script == Script::AcksForResult {
                                // An ack of another kind naming it first, then an `acks`.
                                let state_ack = CoordMsg::TaskStateAck(tether_proto::msg::Ack {
                                    ack_seq: r.seq,
                                    task_id: Some(r.task_id.clone()),
                                    checkpoint_id: None,
                                    chunk: None,
                                    disposition: tether_proto::msg::Disposition::Recorded,
                                    reason: None,
                                    timestamp: now(),
                                });
                                if ws.send(send(state_ack)).await.is_err() {
                                    return;
                                }
                                Some(CoordMsg::Acks(tether_proto::msg::Acks {
                                    recorded: vec![(r.seq, r.seq)],
                                    timestamp: now(),
                                }))
                            } else if script == Script::PieceForResult {
                                Some(CoordMsg::CheckpointPiece(
                                    tether_proto::msg::CheckpointPiece {
                                        ack_seq: r.seq,
                                        task_id: r.task_id,
                                        checkpoint_id: tether_proto::CheckpointId::parse("c-1")
                                            .expect("id"),
                                        offset: 0,
                                        data: Some(tether_proto::task::Blob(vec![1])),
                                        error: None,
                                        code: None,
                                        timestamp: now(),
                                    },
                                ))
                            } else {
                                ack_of(&m).map(|(_, ack)| ack)
                            }
                        }
                        _ => ack_of(&m).map(|(_, ack)| ack),
                    },
                    _ => None,
                };
                if let Some(seq) = heartbeat_in(&m)
                    && ws.send(heartbeat_reply(seq)).await.is_err()
                {
                    return;
                }
                if let Some(r) = reply
                    && ws.send(send(r)).await.is_err()
                {
                    return;
                }
            }
        }
        Script::RequestCheckpoint | Script::StallReads => {
            let task_id = tether_proto::TaskId::parse("t-big").expect("id");
            let attempt = tether_proto::Attempt(1);
            let bytes = match script {
                Script::StallReads => STALLED_CHECKPOINT,
                _ => BIG_CHECKPOINT,
            };
            let assignment = CoordMsg::TaskAssignment(tether_proto::msg::TaskAssignment {
                task_id: task_id.clone(),
                attempt,
                kind: BIG_KIND.into(),
                config: serde_json::json!({ "bytes": bytes }).into(),
                timeout_ms: None,
                checkpoint: None,
                attempt_base: None,
                submit_seq: None,
                timestamp: now(),
            });
            if conn == 0 && ws.send(send(assignment)).await.is_err() {
                return;
            }
            if conn == 0 && script == Script::StallReads {
                let until = Instant::now() + STALL;
                while Instant::now() < until {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    // An answer to no heartbeat: a frame, and nothing more.
                    if ws.send(heartbeat_reply(0)).await.is_err() {
                        return;
                    }
                }
            }
            // Only this script asks for the checkpoint again.
            let (mut chunks, mut asked) = (None, script != Script::RequestCheckpoint);
            while let Some(Ok(m)) = ws.next().await {
                if let Some(seq) = heartbeat_in(&m)
                    && ws.send(heartbeat_reply(seq)).await.is_err()
                {
                    return;
                }
                if let Message::Text(t) = &m {
                    match decode_worker(t.as_str()) {
                        Ok(tether_proto::WorkerMsg::Checkpoint(c)) => chunks = Some(c.chunks),
                        Ok(tether_proto::WorkerMsg::CheckpointData(d)) => {
                            pieces
                                .lock()
                                .expect("lock")
                                .push((d.checkpoint_id.to_string(), d.chunk));
                        }
                        _ => {}
                    }
                }
                if let Some((seq, ack)) = ack_of(&m) {
                    received.lock().expect("lock").push((conn, seq));
                    if ws.send(send(ack)).await.is_err() {
                        return;
                    }
                }
                let all_in =
                    chunks.is_some_and(|n| pieces.lock().expect("lock").len() >= n as usize);
                if all_in && !asked {
                    asked = true;
                    let request =
                        CoordMsg::CheckpointRequest(tether_proto::msg::CheckpointRequest {
                            task_id: task_id.clone(),
                            attempt,
                            checkpoint_id: None,
                            timestamp: now(),
                        });
                    if ws.send(send(request)).await.is_err() {
                        return;
                    }
                }
            }
        }
        Script::Refuse | Script::Unauthorized | Script::Unanswered | Script::Untrusted => {}
    }
}

/// The assignment of [`REASSIGNED`] at attempt 2: a `sleep` task of ten minutes in ten steps.
fn reassignment() -> CoordMsg {
    CoordMsg::TaskAssignment(tether_proto::msg::TaskAssignment {
        task_id: tether_proto::TaskId::parse(REASSIGNED).expect("id"),
        attempt: tether_proto::Attempt(2),
        kind: "sleep".into(),
        config: serde_json::json!({"ms": 600_000, "steps": 10}).into(),
        timeout_ms: None,
        checkpoint: None,
        attempt_base: None,
        submit_seq: None,
        timestamp: now(),
    })
}

/// The assignment of [`ONE_STEP`] at attempt 1: a `sleep` task of one step, at once.
fn one_step() -> CoordMsg {
    CoordMsg::TaskAssignment(tether_proto::msg::TaskAssignment {
        task_id: tether_proto::TaskId::parse(ONE_STEP).expect("id"),
        attempt: tether_proto::Attempt(1),
        kind: "sleep".into(),
        config: serde_json::json!({"ms": 0, "steps": 1}).into(),
        timeout_ms: None,
        checkpoint: None,
        attempt_base: None,
        submit_seq: None,
        timestamp: now(),
    })
}

/// The task of [`Script::StaleResults`] and [`Script::DamagedResult`].
pub const ONE_STEP: &str = "t-one-step";

/// The assignment of [`STOPPING`] at attempt 1, a [`LAST_KIND`] task.
fn last_assignment() -> CoordMsg {
    CoordMsg::TaskAssignment(tether_proto::msg::TaskAssignment {
        task_id: tether_proto::TaskId::parse(STOPPING).expect("id"),
        attempt: tether_proto::Attempt(1),
        kind: LAST_KIND.into(),
        config: serde_json::json!({}).into(),
        timeout_ms: None,
        checkpoint: None,
        attempt_base: None,
        submit_seq: None,
        timestamp: now(),
    })
}

/// Bytes of the checkpoint a [`Script::SlowAcks`] task writes: eight times the send window of
/// a link not measured yet, in pieces of the chunk size.
pub const SLOW_ACKS_CHECKPOINT: usize = 4 << 20;

/// Bytes of the checkpoint a [`Script::RequestCheckpoint`] task writes.
pub const BIG_CHECKPOINT: usize = 16 * 1024;

/// The sequence number of a heartbeat frame.
/// Sleeps until the first of `due` is due; for ever while none is. Its time is read as it is
/// made: the queue is free to change once it waits.
fn first_due<T>(
    due: &std::collections::VecDeque<(Instant, T)>,
) -> impl std::future::Future<Output = ()> + use<T> {
    let next = due.front().map(|&(at, _)| at);
    async move {
        match next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

fn heartbeat_in(m: &Message) -> Option<u64> {
    match m {
        Message::Text(t) => match decode_worker(t.as_str()) {
            Ok(tether_proto::WorkerMsg::Heartbeat(h)) => Some(h.sequence),
            _ => None,
        },
        _ => None,
    }
}

/// A single message with a sequence number (no batch is agreed with these scripts): the
/// number, and its acknowledgement as a coordinator that recorded it sends it.
fn ack_of(m: &Message) -> Option<(u64, CoordMsg)> {
    use tether_proto::WorkerMsg as W;
    let Message::Text(t) = m else { return None };
    let msg = decode_worker(t.as_str()).ok()?;
    let seq = msg.seq()?;
    let ack = tether_proto::msg::Ack {
        ack_seq: seq,
        task_id: None,
        checkpoint_id: None,
        chunk: None,
        disposition: tether_proto::msg::Disposition::Recorded,
        reason: None,
        timestamp: now(),
    };
    let kind: fn(tether_proto::msg::Ack) -> CoordMsg = match msg {
        W::TaskResult(_) => CoordMsg::TaskResultAck,
        W::TaskState(_) => CoordMsg::TaskStateAck,
        W::Checkpoint(_) => CoordMsg::CheckpointAck,
        W::CheckpointData(_) => CoordMsg::CheckpointDataAck,
        W::TaskCancelled(_) => CoordMsg::TaskCancelledAck,
        W::TaskPaused(_) => CoordMsg::TaskPausedAck,
        W::TaskResumed(_) => CoordMsg::TaskResumedAck,
        _ => CoordMsg::TelemetryAck,
    };
    Some((seq.0, kind(ack)))
}

/// The answer to heartbeat `seq`.
fn heartbeat_reply(seq: u64) -> Message {
    Message::text(encode(&CoordMsg::Heartbeat(
        tether_proto::msg::HeartbeatReply::answering(seq),
    )))
}

/// The config a test of a fake connector starts from: worker `w` of a URL the connector
/// stands in for, its backoff without jitter and its randomness seeded, so that its attempts
/// come when the schedule says.
pub fn steady_config() -> tether_worker::WorkerConfig {
    let mut c = tether_worker::WorkerConfig::new(
        "ws://coordinator.invalid:1",
        tether_proto::WorkerId::parse("w").expect("id"),
    );
    c.backoff.jitter = tether_worker::backoff::Jitter::None;
    c.seed = Some(1);
    c
}

/// An agent whose connections go to `fake`.
pub fn agent(fake: &FakeConnector, cfg: tether_worker::WorkerConfig) -> tether_worker::Agent {
    tether_worker::Agent::with_transport(cfg, tether_worker::Executors::builtin(), fake.clone())
        .expect("valid config")
}

/// An agent running on its own task.
pub struct Running {
    pub handle: tether_worker::AgentHandle,
    stop: tokio_util::sync::CancellationToken,
    run: tokio::task::JoinHandle<Result<(), tether_worker::AgentError>>,
}

/// Longest a test waits for an agent's connection state (virtual time in paused tests).
const STATE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

impl Running {
    /// Waits until the agent's state satisfies `f`; a state that never comes fails the test
    /// after [`STATE_WAIT`], naming the state it is in, instead of running it for ever.
    pub async fn wait_state(
        &self,
        f: impl Fn(tether_worker::ConnState) -> bool,
    ) -> tether_worker::ConnState {
        match tokio::time::timeout(STATE_WAIT, self.handle.wait_state(f)).await {
            Ok(s) => s,
            Err(_) => panic!("agent still {:?} after {STATE_WAIT:?}", self.handle.state()),
        }
    }

    pub fn start(fake: &FakeConnector, cfg: tether_worker::WorkerConfig) -> Self {
        Self::start_with(fake.clone(), cfg)
    }

    /// An agent whose connections go to any connector.
    pub fn start_with(connector: impl Connector, cfg: tether_worker::WorkerConfig) -> Self {
        Self::start_running(connector, cfg, tether_worker::Executors::builtin())
    }

    /// An agent with the built-in executors and [`BigCheckpoint`] as [`BIG_KIND`].
    pub fn start_with_big(fake: &FakeConnector, cfg: tether_worker::WorkerConfig) -> Self {
        let mut executors = tether_worker::Executors::builtin();
        executors.register(BIG_KIND, BigCheckpoint);
        Self::start_running(fake.clone(), cfg, executors)
    }

    /// An agent with the built-in executors, [`LastCheckpoint`] as [`LAST_KIND`] and
    /// [`Resumes`] as [`RESUMES_KIND`].
    pub fn start_with_last(fake: &FakeConnector, cfg: tether_worker::WorkerConfig) -> Self {
        let mut executors = tether_worker::Executors::builtin();
        executors.register(LAST_KIND, LastCheckpoint);
        executors.register(RESUMES_KIND, Resumes);
        Self::start_running(fake.clone(), cfg, executors)
    }

    fn start_running(
        connector: impl Connector,
        cfg: tether_worker::WorkerConfig,
        executors: tether_worker::Executors,
    ) -> Self {
        let agent =
            tether_worker::Agent::with_transport(cfg, executors, connector).expect("valid config");
        Self::start_agent(agent)
    }

    /// Runs an agent built by the test (with an ack hook, say) on its own task.
    pub fn start_agent(agent: tether_worker::Agent) -> Self {
        let handle = agent.handle();
        let stop = tokio_util::sync::CancellationToken::new();
        let run = tokio::spawn(agent.run(stop.clone()));
        Self { handle, stop, run }
    }

    /// Shuts the agent down and expects a clean stop.
    /// Tells the agent to stop, without waiting for it.
    pub fn begin_stop(&self) {
        self.stop.cancel();
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.run.await.expect("join").expect("clean stop");
    }

    /// Whether the agent has ended on its own.
    pub fn is_finished(&self) -> bool {
        self.run.is_finished()
    }

    /// Waits for the agent to end on its own (a refusal, attempts given up), within
    /// [`STATE_WAIT`]: how it ended.
    pub async fn ended(self) -> Result<(), tether_worker::AgentError> {
        tokio::time::timeout(STATE_WAIT, self.run)
            .await
            .unwrap_or_else(|_| {
                panic!("agent still {:?} after {STATE_WAIT:?}", self.handle.state())
            })
            .expect("join")
    }
}

/// The `welcome` of worker `w`'s session `session_id`, with these heartbeat interval and
/// timeout, asking for nothing (no nonce, no integrity).
pub fn welcome(session_id: u64, interval_ms: u64, timeout_ms: u64) -> CoordMsg {
    CoordMsg::Welcome(Welcome {
        worker_id: WorkerId::parse("w").expect("id"),
        protocol_version: PROTOCOL_VERSION,
        session_id,
        heartbeat_interval_ms: interval_ms,
        heartbeat_timeout_ms: timeout_ms,
        nonce: None,
        integrity: None,
        timestamp: now(),
    })
}

/// The `registration_ack` of worker `w`'s session `session_id`, agreeing to nothing optional
/// (no compression, batching, compact acknowledgements, limits or rates).
pub fn registration_ack(session_id: u64) -> RegistrationAck {
    RegistrationAck {
        worker_id: WorkerId::parse("w").expect("id"),
        session_id,
        directives: vec![],
        compression: None,
        batching: None,
        compact_acks: false,
        max_frame: None,
        max_checkpoint: None,
        message_rate: None,
        byte_rate: None,
        lost_after_ms: None,
        timestamp: now(),
    }
}

/// Reads `ws` until the worker's registration, or its end.
pub async fn until_registration<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m
            && t.as_str().contains("\"registration\"")
        {
            break;
        }
    }
}

/// Waits until `done`, polling every 10 ms, failing the test after `limit` (virtual time in a
/// paused test, real time otherwise).
pub async fn until(what: &str, limit: std::time::Duration, done: impl Fn() -> bool) {
    let end = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(tokio::time::Instant::now() < end, "never: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The number of the connection being made (0 for the first), counted in `connections`: a
/// scripted coordinator's connector numbers its connections so that each can play its part.
pub fn next_connection(connections: &Mutex<usize>) -> usize {
    let mut n = connections.lock().expect("lock");
    *n += 1;
    *n - 1
}

/// A connection to a scripted coordinator over an in-memory pipe: `serve` is spawned with the
/// coordinator's end, and the worker's end shakes hands at `url`.
pub fn piped<F>(
    url: String,
    config: WebSocketConfig,
    serve: impl FnOnce(tokio::io::DuplexStream) -> F,
) -> BoxFuture<'static, Result<WsStream, ConnectError>>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (client, server) = tokio::io::duplex(1 << 16);
    tokio::spawn(serve(server));
    Box::pin(async move {
        let io: Pin<Box<dyn Io>> = Box::pin(client);
        handshake(url, io, config).await
    })
}
