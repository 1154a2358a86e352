//! The wait for the `registration_ack`: bounded by the coordinator's liveness, not by a fixed
//! time. A coordinator whose ack waits for a commit held up (its disk full) pings the worker
//! meanwhile; the worker waits on its connection for as long as the pings come, and gives the
//! registration up only after its heartbeat timeout without any frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use tether_proto::encode;
use tether_proto::msg::CoordMsg;
use tether_worker::connector::{ConnectError, Connector, WsStream};
use tether_worker::{ConnState, WorkerConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::fake::{KEEPALIVE, Running, piped, registration_ack, until_registration, welcome};

/// A coordinator that welcomes the worker, reads its registration, and then, for `hold`,
/// pings it every [`KEEPALIVE`] (`pinged`) or says nothing; then acknowledges the
/// registration and answers heartbeats. Counts the connections.
#[derive(Clone)]
struct HeldAck {
    hold: Duration,
    pinged: bool,
    connections: Arc<AtomicUsize>,
}

impl HeldAck {
    fn new(hold: Duration, pinged: bool) -> Self {
        Self {
            hold,
            pinged,
            connections: Arc::default(),
        }
    }
}

impl Connector for HeldAck {
    fn connect(
        &self,
        url: String,
        config: WebSocketConfig,
    ) -> BoxFuture<'static, Result<WsStream, ConnectError>> {
        self.connections.fetch_add(1, Ordering::SeqCst);
        let (hold, pinged) = (self.hold, self.pinged);
        piped(url, config, move |io| serve(io, hold, pinged))
    }
}

async fn serve(io: tokio::io::DuplexStream, hold: Duration, pinged: bool) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(io).await else {
        return;
    };
    let send = |m: CoordMsg| Message::text(encode(&m));
    if ws.send(send(welcome(1, 5000, 15000))).await.is_err() {
        return;
    }
    until_registration(&mut ws).await;
    // The commit is held: pings (and the worker's pongs read), or silence.
    if !hold_then_ack(&mut ws, hold, pinged.then_some(KEEPALIVE)).await {
        return;
    }
    while let Some(Ok(m)) = ws.next().await {
        let Message::Text(t) = m else { continue };
        if let Ok(tether_proto::msg::WorkerMsg::Heartbeat(h)) = tether_proto::decode_worker(&t) {
            let reply = tether_proto::msg::HeartbeatReply::answering(h.sequence);
            if ws.send(send(CoordMsg::Heartbeat(reply))).await.is_err() {
                return;
            }
        }
    }
}

/// Holds the registration's commit for `hold`, pinging the worker every `every` (`None`:
/// saying nothing) and reading its frames (its pongs), then acknowledges the registration.
/// False if the connection ended first.
async fn hold_then_ack(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::io::DuplexStream>,
    hold: Duration,
    every: Option<Duration>,
) -> bool {
    let held = tokio::time::sleep(hold);
    tokio::pin!(held);
    let period = every.unwrap_or(Duration::from_secs(3600));
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            () = &mut held => break,
            _ = keepalive.tick(), if every.is_some() => {
                if ws.send(Message::Ping(Vec::new().into())).await.is_err() {
                    return false;
                }
            }
            m = ws.next() => match m {
                Some(Ok(_)) => {}
                _ => return false,
            },
        }
    }
    let ack = CoordMsg::RegistrationAck(registration_ack(1));
    ws.send(Message::text(encode(&ack))).await.is_ok()
}

fn config() -> WorkerConfig {
    crate::fake::steady_config()
}

/// Pinged for four of its heartbeat timeouts while its ack waits, the worker keeps its one
/// connection and registers on it once the ack comes.
#[tokio::test(start_paused = true)]
async fn a_registration_whose_ack_waits_while_the_coordinator_pings_keeps_its_connection() {
    let cfg = config();
    let hold = cfg.heartbeat_timeout * 4;
    let fake = HeldAck::new(hold, true);
    let started = tokio::time::Instant::now();
    let running = Running::start_with(fake.clone(), cfg);
    running.wait_state(|s| s == ConnState::Connected).await;
    assert!(
        started.elapsed() >= hold,
        "registered after {:?}",
        started.elapsed()
    );
    assert_eq!(fake.connections.load(Ordering::SeqCst), 1);
    let s = running.handle.stats();
    assert_eq!(
        (s.connection_attempts, s.failed_connections),
        (1, 0),
        "{s:?}"
    );
    assert_eq!(running.handle.registrations(), 1);
    running.stop().await;
}

/// A coordinator that says nothing at all after the registration is given up at the worker's
/// heartbeat timeout, and the worker connects again.
#[tokio::test(start_paused = true)]
async fn a_registration_answered_by_no_frame_at_all_is_given_up_at_the_heartbeat_timeout() {
    let cfg = config();
    let timeout = cfg.heartbeat_timeout;
    let fake = HeldAck::new(Duration::from_secs(3600), false);
    let started = tokio::time::Instant::now();
    let running = Running::start_with(fake.clone(), cfg);
    let waited = tokio::time::timeout(Duration::from_secs(600), async {
        while fake.connections.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the registration was never given up");
    let gave_up = started.elapsed();
    assert!(gave_up >= timeout, "given up after {gave_up:?}");
    let s = running.handle.stats();
    assert!(s.failed_connections >= 1, "{s:?}");
    assert_eq!(running.handle.registrations(), 0);
    running.stop().await;
}

/// A coordinator that welcomes the worker, reads its registration and records the liveness
/// timeout it states (`stated`), then, for `hold`, pings it every third of that timeout (as
/// the coordinator does for a worker that states one; a worker that states none is not pinged
/// here), then acknowledges the registration. Counts the connections.
#[derive(Clone)]
struct PacedByStated {
    hold: Duration,
    stated: Arc<std::sync::Mutex<Vec<Option<u64>>>>,
    connections: Arc<AtomicUsize>,
}

impl Connector for PacedByStated {
    fn connect(
        &self,
        url: String,
        config: WebSocketConfig,
    ) -> BoxFuture<'static, Result<WsStream, ConnectError>> {
        self.connections.fetch_add(1, Ordering::SeqCst);
        let (hold, stated) = (self.hold, self.stated.clone());
        piped(url, config, move |io| async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(io).await else {
                return;
            };
            let send = |m: CoordMsg| Message::text(encode(&m));
            if ws.send(send(welcome(1, 5000, 15000))).await.is_err() {
                return;
            }
            let registration = loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        if let Ok(tether_proto::msg::WorkerMsg::Registration(r)) =
                            tether_proto::decode_worker(&t)
                        {
                            break r;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                }
            };
            stated
                .lock()
                .expect("stated")
                .push(registration.heartbeat_timeout_ms);
            let every = registration
                .heartbeat_timeout_ms
                .map(|ms| Duration::from_millis(ms) / 3);
            if !hold_then_ack(&mut ws, hold, every).await {
                return;
            }
            while let Some(Ok(_)) = ws.next().await {}
        })
    }
}

/// The registration states the liveness timeout the session waits for its ack by (here a
/// configured 9 s, not the default), and a coordinator that pings it every third of that
/// while a commit holds the ack up for four such timeouts keeps it on its one connection.
#[tokio::test(start_paused = true)]
async fn the_registration_states_the_timeout_its_wait_for_the_ack_is_bounded_by() {
    let mut cfg = config();
    cfg.heartbeat_timeout = Duration::from_secs(9);
    let fake = PacedByStated {
        hold: cfg.heartbeat_timeout * 4,
        stated: Arc::default(),
        connections: Arc::default(),
    };
    let running = Running::start_with(fake.clone(), cfg);
    running.wait_state(|s| s == ConnState::Connected).await;
    assert_eq!(*fake.stated.lock().expect("stated"), [Some(9000)]);
    assert_eq!(fake.connections.load(Ordering::SeqCst), 1);
    assert_eq!(running.handle.registrations(), 1);
    running.stop().await;
}
