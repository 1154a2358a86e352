//! A small seeded network simulation under paused time: the worker's connections run over a
//! link that the test can partition (every byte dropped, the connection left open: the
//! half-open case), hold (bytes kept back, none lost, released in order on repair) and repair,
//! to a fake coordinator that records results by (task, attempt) as ground truth. Minutes of
//! simulated trouble take milliseconds.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tether_proto::msg::{
    Ack, CoordMsg, Disposition, HeartbeatReply, TaskAssignment, WorkerMsg, now,
};
use tether_proto::{Attempt, TaskId, WorkerId, decode_worker, encode};
use tether_worker::backoff::{BackoffConfig, Jitter};
use tether_worker::connector::{ConnectError, Connector, Io, WsStream, handshake};
use tether_worker::eventlog::{self, Event};
use tether_worker::{ConnState, WorkerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::fake::{Running, registration_ack, welcome};

/// What the network does to every connection, now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Up,
    /// Drop every byte; connections stay open (no FIN, no RST).
    Partition,
    /// Keep every byte back; deliver them all, in order, on repair.
    Hold,
}

/// A result's key, as a coordinator records it.
type Key = (TaskId, Attempt);

/// The fake coordinator's record: the ground truth of the simulation.
#[derive(Debug, Default)]
pub struct Truth {
    /// Registrations answered.
    pub registrations: u64,
    /// The connection of each registration answered.
    pub registered_on: Vec<usize>,
    /// Connections on which a second registration arrived (must stay 0).
    pub double_registrations: u64,
    /// Times each (task, attempt) result was recorded, as a coordinator that keys results by
    /// (task, attempt) records them: the first copy; a later one is a duplicate (docs/PROTOCOL.md
    /// section 8). So at most 1: a task missing here is a result lost.
    pub recorded: HashMap<Key, u32>,
    /// The connection (its index among the attempts) that carried each copy of each result,
    /// in the order they arrived.
    pub copies: HashMap<Key, Vec<usize>>,
    /// Results received again after they were recorded (acknowledged as duplicates).
    pub duplicates: u64,
    /// Tasks to hand out at the first registration.
    pub to_assign: Vec<(TaskId, u64)>,
    /// The tasks handed out (or to be), each at attempt 1: the results to be recorded.
    pub assigned: Vec<TaskId>,
}

#[derive(Clone)]
pub struct SimNet {
    mode: Arc<watch::Sender<Mode>>,
    pub truth: Arc<Mutex<Truth>>,
    pub attempts: Arc<Mutex<Vec<Instant>>>,
    pub dropped: Arc<AtomicU64>,
    /// The worker's ends of connections open now (attempts under way and the session), and
    /// the most ever open at once.
    pub open: Arc<(AtomicU64, AtomicU64)>,
    /// The worker's side: for each result, the connection whose session first handed its
    /// acknowledgement to the worker (from the agent's ack hook).
    pub acked_on: Arc<Mutex<HashMap<Key, usize>>>,
    /// The worker's side: each copy of a result the worker wrote to a connection after it had
    /// the acknowledgement of that result (read from the bytes it writes), with the connection.
    /// Must stay empty: an acknowledged result has left the outbox.
    pub sent_after_ack: Arc<Mutex<Vec<(Key, usize)>>>,
    /// Copies of results the worker wrote, over all connections (the tap's own check: every
    /// copy the coordinator received was written, and read as such).
    pub results_written: Arc<AtomicU64>,
}

impl SimNet {
    pub fn new(tasks: Vec<(TaskId, u64)>) -> Self {
        Self {
            mode: Arc::new(watch::channel(Mode::Up).0),
            truth: Arc::new(Mutex::new(Truth {
                assigned: tasks.iter().map(|(id, _)| id.clone()).collect(),
                to_assign: tasks,
                ..Truth::default()
            })),
            attempts: Arc::default(),
            dropped: Arc::default(),
            open: Arc::default(),
            acked_on: Arc::default(),
            sent_after_ack: Arc::default(),
            results_written: Arc::default(),
        }
    }

    /// A worker whose connections go through this network, its acknowledgements of results
    /// noted in [`SimNet::acked_on`].
    pub fn start(&self, cfg: WorkerConfig) -> Running {
        let agent = tether_worker::Agent::with_transport(
            cfg,
            tether_worker::Executors::builtin(),
            self.clone(),
        )
        .expect("valid config");
        let shared = agent.handle().shared;
        let acked_on = self.acked_on.clone();
        let agent = agent.on_ack(move |_, held| {
            if let Some(WorkerMsg::TaskResult(r)) = held {
                // Sessions run one at a time and dial nothing while they live: the latest
                // attempt's generation is the session's, and attempt `g` is connection `g - 1`.
                let conn = shared.generation.load(Ordering::SeqCst) as usize - 1;
                let mut a = acked_on.lock().expect("lock");
                a.entry((r.task_id.clone(), r.attempt)).or_insert(conn);
            }
        });
        Running::start_agent(agent)
    }

    pub fn set(&self, m: Mode) {
        self.mode.send_replace(m);
    }

    pub fn attempts(&self) -> Vec<Instant> {
        self.attempts.lock().expect("lock").clone()
    }

    pub fn truth<T>(&self, f: impl FnOnce(&Truth) -> T) -> T {
        f(&self.truth.lock().expect("lock"))
    }
}

impl Connector for SimNet {
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
        let net = self.clone();
        Box::pin(async move {
            let (client, near) = tokio::io::duplex(1 << 16);
            let (far, server) = tokio::io::duplex(1 << 16);
            let (near_r, near_w) = tokio::io::split(near);
            let (far_r, far_w) = tokio::io::split(far);
            tokio::spawn(pump(
                near_r,
                far_w,
                net.mode.subscribe(),
                net.dropped.clone(),
            ));
            tokio::spawn(pump(
                far_r,
                near_w,
                net.mode.subscribe(),
                net.dropped.clone(),
            ));
            tokio::spawn(serve(server, net.truth.clone(), conn));
            let tap = Tap {
                conn,
                frames: ClientFrames::default(),
                acked_on: net.acked_on.clone(),
                sent_after_ack: net.sent_after_ack.clone(),
                results_written: net.results_written.clone(),
            };
            let io: Pin<Box<dyn Io>> = Box::pin(Counted::new(client, net.open.clone(), tap));
            handshake(url, io, config).await
        })
    }
}

/// The worker's end of a connection, counted in [`SimNet::open`] while it exists, its
/// writes read by a [`Tap`].
struct Counted {
    io: DuplexStream,
    open: Arc<(AtomicU64, AtomicU64)>,
    tap: Tap,
}

impl Counted {
    fn new(io: DuplexStream, open: Arc<(AtomicU64, AtomicU64)>, tap: Tap) -> Self {
        let now = open.0.fetch_add(1, Ordering::SeqCst) + 1;
        open.1.fetch_max(now, Ordering::SeqCst);
        Self { io, open, tap }
    }
}

/// Reads what the worker writes to connection `conn`, as it writes it: each result in a frame
/// whose last byte is written after the worker had that result's acknowledgement (the ack hook
/// noted it in `acked_on`) goes to `sent_after_ack`. (Its ack cannot answer this copy: the
/// coordinator acknowledges what it read whole.)
struct Tap {
    conn: usize,
    frames: ClientFrames,
    acked_on: Arc<Mutex<HashMap<Key, usize>>>,
    sent_after_ack: Arc<Mutex<Vec<(Key, usize)>>>,
    results_written: Arc<AtomicU64>,
}

impl Tap {
    fn wrote(&mut self, bytes: &[u8]) {
        for text in self.frames.feed(bytes) {
            let msgs = match text.trim_start().starts_with('[') {
                true => serde_json::from_str::<Vec<serde_json::Value>>(&text)
                    .expect("a batch frame")
                    .into_iter()
                    .map(|v| serde_json::from_value::<WorkerMsg>(v).expect("a message"))
                    .collect(),
                false => vec![decode_worker(&text).expect("a message")],
            };
            for msg in msgs {
                let WorkerMsg::TaskResult(r) = msg else {
                    continue;
                };
                self.results_written.fetch_add(1, Ordering::SeqCst);
                let key = (r.task_id, r.attempt);
                if self.acked_on.lock().expect("lock").contains_key(&key) {
                    let mut late = self.sent_after_ack.lock().expect("lock");
                    late.push((key, self.conn));
                }
            }
        }
    }
}

/// The text frames a WebSocket client writes, from its bytes: the upgrade request is skipped,
/// masks are undone, fragments joined.
#[derive(Default)]
struct ClientFrames {
    buf: Vec<u8>,
    upgraded: bool,
    /// A text message whose last fragment has not come yet.
    partial: Option<Vec<u8>>,
}

impl ClientFrames {
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut texts = Vec::new();
        if !self.upgraded {
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                return texts;
            };
            self.buf.drain(..end + 4);
            self.upgraded = true;
        }
        while let Some((fin, opcode, payload)) = self.frame() {
            match opcode {
                1 => self.partial = Some(payload),
                0 => match self.partial.as_mut() {
                    Some(p) => p.extend_from_slice(&payload),
                    None => continue,
                },
                _ => continue,
            }
            if fin && let Some(p) = self.partial.take() {
                texts.push(String::from_utf8(p).expect("a text frame is UTF-8"));
            }
        }
        texts
    }

    /// The next whole frame (FIN, opcode, unmasked payload), taken from the buffer.
    fn frame(&mut self) -> Option<(bool, u8, Vec<u8>)> {
        let b = &self.buf;
        let head = |n: usize| b.get(..n);
        let (fin, opcode, masked) = (b.first()? & 0x80 != 0, b[0] & 0x0f, b.get(1)? & 0x80 != 0);
        let (len, mut at) = match b[1] & 0x7f {
            126 => (
                u16::from_be_bytes(head(4)?[2..4].try_into().ok()?) as usize,
                4,
            ),
            127 => (
                u64::from_be_bytes(head(10)?[2..10].try_into().ok()?) as usize,
                10,
            ),
            n => (usize::from(n), 2),
        };
        let mask: Option<[u8; 4]> = match masked {
            true => {
                let m = head(at + 4)?[at..at + 4].try_into().ok()?;
                at += 4;
                Some(m)
            }
            false => None,
        };
        let mut payload = head(at + len)?[at..].to_vec();
        if let Some(m) = mask {
            for (i, x) in payload.iter_mut().enumerate() {
                *x ^= m[i % 4];
            }
        }
        self.buf.drain(..at + len);
        Some((fin, opcode, payload))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = written {
            self.tap.wrote(&buf[..n]);
        }
        written
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Carries one direction of one connection through the network's mode.
async fn pump(
    mut from: ReadHalf<DuplexStream>,
    mut to: WriteHalf<DuplexStream>,
    mut mode: watch::Receiver<Mode>,
    dropped: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        // A FIN waits for the network like data does, and is never dropped.
        loop {
            let m = *mode.borrow_and_update();
            match (m, n) {
                (Mode::Up, 0) => {
                    let _ = to.shutdown().await;
                    return;
                }
                (Mode::Up, n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    break;
                }
                (Mode::Partition, n) if n > 0 => {
                    dropped.fetch_add(n as u64, Ordering::Relaxed);
                    break;
                }
                _ => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Connection `conn` of the fake coordinator: welcome, registration, heartbeat replies, the
/// assignments at the first registration, and acks that say what was recorded.
async fn serve(io: DuplexStream, truth: Arc<Mutex<Truth>>, conn: usize) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(io).await else {
        return;
    };
    let send = |m: CoordMsg| Message::text(encode(&m));
    if ws.send(send(welcome(1, 1000, 3000))).await.is_err() {
        return;
    }
    let mut registered = false;
    while let Some(Ok(m)) = ws.next().await {
        let Message::Text(t) = m else { continue };
        let Ok(msg) = decode_worker(t.as_str()) else {
            continue;
        };
        let ack = |seq, task_id, disposition| Ack {
            ack_seq: seq,
            task_id,
            checkpoint_id: None,
            chunk: None,
            disposition,
            reason: None,
            timestamp: now(),
        };
        let replies: Vec<CoordMsg> = match msg {
            WorkerMsg::Registration(_) => {
                let assign = {
                    let mut t = truth.lock().expect("lock");
                    t.registrations += 1;
                    t.registered_on.push(conn);
                    if registered {
                        t.double_registrations += 1;
                    }
                    registered = true;
                    std::mem::take(&mut t.to_assign)
                };
                let mut v = vec![CoordMsg::RegistrationAck(registration_ack(1))];
                v.extend(assign.into_iter().map(|(task_id, ms)| {
                    CoordMsg::TaskAssignment(TaskAssignment {
                        task_id,
                        attempt: Attempt(1),
                        kind: "sleep".into(),
                        config: serde_json::json!({"ms": ms, "steps": 4}).into(),
                        timeout_ms: None,
                        checkpoint: None,
                        attempt_base: None,
                        submit_seq: None,
                        timestamp: now(),
                    })
                }));
                v
            }
            WorkerMsg::Heartbeat(h) => {
                vec![CoordMsg::Heartbeat(HeartbeatReply::answering(h.sequence))]
            }
            WorkerMsg::TaskResult(r) => {
                let mut t = truth.lock().expect("lock");
                let key = (r.task_id.clone(), r.attempt);
                t.copies.entry(key.clone()).or_default().push(conn);
                // Recorded once, by (task, attempt); a copy of a recorded result is a duplicate.
                let d = match t.recorded.contains_key(&key) {
                    false => {
                        t.recorded.insert(key, 1);
                        Disposition::Recorded
                    }
                    true => {
                        t.duplicates += 1;
                        Disposition::Duplicate
                    }
                };
                vec![CoordMsg::TaskResultAck(ack(r.seq, Some(r.task_id), d))]
            }
            WorkerMsg::TaskState(s) => vec![CoordMsg::TaskStateAck(ack(
                s.seq,
                Some(s.task_id),
                Disposition::Recorded,
            ))],
            WorkerMsg::Telemetry(s) => {
                vec![CoordMsg::TelemetryAck(ack(
                    s.seq,
                    None,
                    Disposition::Recorded,
                ))]
            }
            _ => vec![],
        };
        for r in replies {
            if ws.send(send(r)).await.is_err() {
                return;
            }
        }
    }
}

const T: Duration = Duration::from_secs(3);
const INTERVAL: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn config() -> WorkerConfig {
    let mut c = WorkerConfig::new("ws://sim.invalid:1", WorkerId::parse("w").expect("id"));
    c.heartbeat_interval = INTERVAL;
    c.heartbeat_timeout = T;
    c.ws_ping_interval = INTERVAL;
    c.connect_timeout = CONNECT_TIMEOUT;
    c.healthy_after = Duration::from_secs(5);
    c.telemetry_interval = Duration::from_secs(5);
    c.backoff = BackoffConfig {
        initial: Duration::from_millis(500),
        factor: 2.0,
        max: Duration::from_secs(4),
        jitter: Jitter::None,
        max_attempts: None,
    };
    c.slots = 8;
    c.seed = Some(1);
    c
}

fn tasks(rng: &mut SmallRng, n: usize) -> Vec<(TaskId, u64)> {
    (0..n)
        .map(|i| {
            (
                TaskId::parse(&format!("t{i}")).expect("id"),
                rng.random_range(1_000..=20_000),
            )
        })
        .collect()
}

/// Every task's result recorded, once; nothing left to deliver; and no result sent again
/// once the worker had its acknowledgement.
///
/// A copy received twice is allowed (the coordinator keys results by (task, attempt) and
/// answers `duplicate`, docs/PROTOCOL.md section 8), but only while the worker could not know
/// it arrived: its acknowledgement was lost, or held back, with a session. Once a session
/// handed the worker the acknowledgement, the result has left its outbox, and no later
/// write may carry it, on that connection or a later one: a worker that sent acknowledged
/// results again at each reconnect would cost the coordinator a duplicate per result per
/// reconnect, for ever. A connection carries a result once, so the copies of a result are at
/// most the connections from its first to the one that acknowledged it.
async fn assert_each_result_recorded_once(net: &SimNet, run: &Running, n: usize) {
    let end = Instant::now() + Duration::from_secs(600);
    while net.truth(|t| t.recorded.len()) < n || !run.handle.outbox.pending_results().is_empty() {
        assert!(Instant::now() < end, "results still missing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acked_on = net.acked_on.lock().expect("lock").clone();
    let sent_after_ack = net.sent_after_ack.lock().expect("lock").clone();
    assert!(
        sent_after_ack.is_empty(),
        "results the worker wrote again after it had their acknowledgement (with the \
         connection): {sent_after_ack:?}; acknowledged on: {acked_on:?}"
    );
    net.truth(|t| {
        let received: usize = t.copies.values().map(Vec::len).sum();
        let written = net.results_written.load(Ordering::SeqCst);
        assert!(
            written >= received as u64,
            "the tap read {written} results written, the coordinator received {received}"
        );
        assert_eq!(t.recorded.len(), n, "{:?}", t.recorded);
        let mut recorded: Vec<&Key> = t.recorded.keys().collect();
        recorded.sort();
        let mut assigned: Vec<Key> = t
            .assigned
            .iter()
            .map(|id| (id.clone(), Attempt(1)))
            .collect();
        assigned.sort();
        assert!(
            recorded.iter().copied().eq(assigned.iter()),
            "recorded {recorded:?}, assigned {assigned:?}"
        );
        for (key, conns) in &t.copies {
            let acked = acked_on.get(key);
            assert!(acked.is_some(), "{key:?}: the worker never had its ack");
            let resent: Vec<usize> = conns
                .iter()
                .copied()
                .filter(|c| acked.is_some_and(|a| c > a))
                .collect();
            assert!(
                resent.is_empty(),
                "{key:?} was acknowledged to the worker on connection {acked:?}, and sent again \
                 on {resent:?} (every copy: {conns:?})"
            );
            let mut distinct = conns.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(
                distinct.len(),
                conns.len(),
                "{key:?}: sent twice on one connection (every copy: {conns:?})"
            );
        }
    });
}

/// Connection states with the (paused) time they began.
fn record_states(run: &Running) -> Arc<Mutex<Vec<(Instant, ConnState)>>> {
    let log = Arc::new(Mutex::new(vec![(Instant::now(), run.handle.state())]));
    let mut rx = run.handle.shared.state.subscribe();
    let out = log.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let s = *rx.borrow_and_update();
            out.lock().expect("lock").push((Instant::now(), s));
        }
    });
    log
}

#[tokio::test(start_paused = true)]
async fn a_partition_is_detected_within_the_timeout_and_reconnects_follow_the_backoff() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = SmallRng::seed_from_u64(11);
    let net = SimNet::new(tasks(&mut rng, 4));
    let mut cfg = config();
    cfg.event_log = Some(dir.path().join("events.jsonl"));
    // Longer than any delay: attempts into the partition are never answered and never time
    // out before the next one is due.
    cfg.connect_timeout = Duration::from_secs(10);
    let run = net.start(cfg);
    let h = run.handle.clone();
    run.wait_state(|s| s == ConnState::Connected).await;
    tokio::time::sleep(Duration::from_secs(6)).await;

    net.set(Mode::Partition);
    let cut = Instant::now();
    run.wait_state(|s| s != ConnState::Connected).await;
    let detect = cut.elapsed();
    assert!(
        detect <= T && detect >= T - INTERVAL,
        "declared dead {detect:?} after the partition"
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = net.attempts();
    net.set(Mode::Up);
    let repaired = Instant::now();
    run.wait_state(|s| s == ConnState::Connected).await;
    let back = repaired.elapsed();
    assert!(
        net.dropped.load(Ordering::Relaxed) > 0,
        "the partition dropped bytes"
    );

    // The session had been healthy, so the backoff started over: 0.5 s after the loss, then
    // each attempt, unanswered, gets the next beside it after 1, 2, 4, 4 s: the pace of
    // attempts that fail at once, not the connect timeout's.
    let dead_at = cut + detect;
    let first = during[1] - dead_at;
    assert_eq!(first, Duration::from_millis(500));
    let gaps: Vec<u64> = during[1..]
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect();
    assert_eq!(&gaps[..4], [1_000, 2_000, 4_000, 4_000], "{gaps:?}");
    // Back within the current delay (4 s, the cap) of the repair, not after the 10 s timeout
    // of an attempt made into the partition.
    assert!(back <= Duration::from_secs(4), "back after {back:?}");
    assert_eq!(
        net.open.1.load(Ordering::SeqCst),
        2,
        "two attempts under way at most, the older given up for the newer"
    );
    assert_eq!(
        net.open.0.load(Ordering::SeqCst),
        1,
        "once back, the session's connection alone: the attempts beside it were dropped"
    );

    assert_each_result_recorded_once(&net, &run, 4).await;
    assert_eq!(net.truth(|t| t.registrations), h.registrations());
    assert_eq!(net.truth(|t| t.double_registrations), 0);
    assert_eq!(h.registrations(), 2);
    assert_eq!(h.shared.max_live_connections.load(Ordering::SeqCst), 1);
    run.stop().await;

    // The worker's own record says the same: one loss, by the liveness timeout.
    let read = eventlog::read(&dir.path().join("events.jsonl")).expect("read");
    assert!(read.damaged.is_empty() && !read.torn, "{read:?}");
    let records = read.records;
    let lost: Vec<_> = records
        .iter()
        .filter_map(|r| match &r.event {
            Event::SessionLost { dead, .. } => Some(*dead),
            _ => None,
        })
        .collect();
    assert_eq!(lost, [true]);
    let acks = records
        .iter()
        .filter(|r| {
            matches!(
                r.event,
                Event::ResultAck {
                    disposition: Disposition::Recorded,
                    ..
                }
            )
        })
        .count();
    assert_eq!(acks, 4);
}

#[tokio::test(start_paused = true)]
async fn a_hold_shorter_than_the_timeout_loses_nothing_and_keeps_the_session() {
    let net = SimNet::new(vec![(TaskId::parse("t0").expect("id"), 4_000)]);
    let run = net.start(config());
    let h = run.handle.clone();
    run.wait_state(|s| s == ConnState::Connected).await;
    let states = record_states(&run);
    // The task ends inside the hold: its result waits in the network, not in a dead session.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    net.set(Mode::Hold);
    tokio::time::sleep(T - INTERVAL - Duration::from_millis(100)).await;
    net.set(Mode::Up);
    assert_each_result_recorded_once(&net, &run, 1).await;
    assert_eq!(
        states.lock().expect("lock").len(),
        1,
        "never left Connected"
    );
    assert_eq!(h.registrations(), 1);
    assert_eq!(net.attempts().len(), 1);
    assert_eq!(net.truth(|t| t.duplicates), 0);
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_hold_longer_than_the_timeout_is_declared_dead_and_the_held_result_is_recorded_once() {
    let net = SimNet::new(vec![(TaskId::parse("t0").expect("id"), 4_000)]);
    let run = net.start(config());
    let h = run.handle.clone();
    run.wait_state(|s| s == ConnState::Connected).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    net.set(Mode::Hold);
    let held = Instant::now();
    run.wait_state(|s| s != ConnState::Connected).await;
    assert!(
        held.elapsed() <= T,
        "declared dead after {:?}",
        held.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    // The result was sent into the held link before the session was declared dead; it is
    // released to the old session now, and sent again on the new one.
    net.set(Mode::Up);
    run.wait_state(|s| s == ConnState::Connected).await;
    assert_each_result_recorded_once(&net, &run, 1).await;
    // Registrations whose ack was held past the worker's deadline count on the far side only.
    assert!(net.truth(|t| t.registrations) >= h.registrations());
    assert_eq!(net.truth(|t| t.double_registrations), 0);
    assert_eq!(
        net.truth(|t| t.duplicates),
        1,
        "the held copy and the resent copy both arrived; one was recorded"
    );
    assert_eq!(h.shared.max_live_connections.load(Ordering::SeqCst), 1);
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn seeded_partitions_and_holds_deliver_every_result_once_over_one_live_session() {
    let (mut detections, mut outages, mut exposed) = (0, 0, 0);
    for seed in 1..=12u64 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let n = rng.random_range(2..=6);
        let net = SimNet::new(tasks(&mut rng, n));
        let run = net.start(config());
        let h = run.handle.clone();
        run.wait_state(|s| s == ConnState::Connected).await;
        let states = record_states(&run);
        let mut phases = Vec::new();
        for _ in 0..6 {
            let mode = match rng.random_range(0..3) {
                0 => Mode::Up,
                1 => Mode::Partition,
                _ => Mode::Hold,
            };
            let len = Duration::from_millis(rng.random_range(500..=12_000));
            let connected = h.state() == ConnState::Connected;
            let start = Instant::now();
            net.set(mode);
            tokio::time::sleep(len).await;
            phases.push((mode, start, len, connected));
        }
        net.set(Mode::Up);
        assert_each_result_recorded_once(&net, &run, n).await;
        // Detection: a partition or hold that began on a live session and outlasted the
        // timeout ended that session within the timeout.
        let states = states.lock().expect("lock").clone();
        for (mode, start, len, connected) in phases {
            if mode == Mode::Up || !connected || len <= T {
                continue;
            }
            let lost = states
                .iter()
                .find(|(at, s)| *at >= start && *s != ConnState::Connected)
                .map(|(at, _)| *at - start);
            assert!(
                lost.is_some_and(|d| d <= T),
                "seed {seed}: {mode:?} of {len:?} detected after {lost:?}"
            );
            detections += 1;
        }
        outages += h.registrations() - 1;
        // Results acknowledged to the worker before a later session registered: a worker that
        // sent acknowledged results again would have sent these.
        let last = net.truth(|t| t.registered_on.iter().copied().max().unwrap_or(0));
        exposed += net
            .acked_on
            .lock()
            .expect("lock")
            .values()
            .filter(|&&a| a < last)
            .count();
        // A registration whose ack the network ate counts on the far side only; none came
        // twice on one connection.
        assert!(
            net.truth(|t| t.registrations) >= h.registrations(),
            "seed {seed}"
        );
        assert_eq!(net.truth(|t| t.double_registrations), 0, "seed {seed}");
        assert_eq!(h.shared.max_live_connections.load(Ordering::SeqCst), 1);
        run.stop().await;
    }
    // The seeds do exercise the corners: silent links detected, sessions re-established.
    assert!(detections >= 6, "{detections} detections checked");
    assert!(outages >= 6, "{outages} reconnections");
    assert!(
        exposed >= 10,
        "{exposed} results acknowledged before a later session"
    );
}

/// `max_attempts` counts failed connection attempts, not the session that was lost: with one
/// allowed, a worker whose healthy session was cut makes one attempt to reconnect, and gives
/// up only once that one failed.
#[tokio::test(start_paused = true)]
async fn a_lost_session_is_not_a_failed_attempt_and_max_attempts_one_still_reconnects_once() {
    let net = SimNet::new(vec![]);
    let mut cfg = config();
    cfg.backoff.max_attempts = Some(1);
    let agent =
        tether_worker::Agent::with_transport(cfg, tether_worker::Executors::builtin(), net.clone())
            .expect("valid config");
    let h = agent.handle();
    let run = tokio::spawn(agent.run(tokio_util::sync::CancellationToken::new()));
    h.wait_state(|s| s == ConnState::Connected).await;
    // Healthy: connected longer than `healthy_after` (5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    net.set(Mode::Partition);
    let r = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the worker gives up")
        .expect("join");
    assert!(
        net.dropped.load(Ordering::Relaxed) > 0,
        "the partition dropped bytes"
    );
    assert!(
        matches!(r, Err(tether_worker::AgentError::GaveUp { attempts: 1 })),
        "{r:?}"
    );
    assert_eq!(
        net.attempts().len(),
        2,
        "the session's connection, then one reconnect attempt: {:?}",
        net.attempts()
    );
    assert_eq!(h.state(), ConnState::Failed);
}
