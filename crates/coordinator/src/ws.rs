//! Worker sessions. The upgrade path is parsed strictly before the upgrade (anything else is a
//! 4xx, never an accepted-then-closed socket). Each session: welcome, then frames to the core,
//! heartbeats answered here, a structured `error` for unknown or malformed frames (the session
//! goes on), 1009 for oversize frames, and a close when nothing arrives for `heartbeat_timeout`.
//! A connection reaches the core only with its registration, so one that never registers never
//! replaces the worker's session. With worker authentication on, the welcome carries a nonce and
//! the registration must be signed over it (else `error` `unauthorized` and close 4001). Until it
//! registers, the connection reads within its budget before registration (`admission`); after,
//! a session's frames are read at its message and byte rates (`Pace`). Once the core knows a
//! session, it hears of its end however the session's task ends, a panic included
//! (`Departure`); a wait for room in the core's queue never counts as the worker's silence, nor
//! does its wait for its `registration_ack` (pinged while a commit holds the ack up).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, OriginalUri, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tether_proto::auth::{AuthError, Challenge, NONCE_BYTES, to_hex};
use tether_proto::codec::{MAX_BATCH_MESSAGES, decode_worker_batch};
use tether_proto::compress::{InflateError, ZSTD, deflate, inflate};
use tether_proto::drain::while_draining;
use tether_proto::endpoint::{PathError, is_pipelined, parse_endpoint_path};
use tether_proto::integrity::{
    self, DEFAULT_MAX_FAILURES, Direction, HMAC_SHA256, MacError, Opener, Sealer, SessionKey,
};
use tether_proto::msg::{
    Acks, Batching, CoordMsg, Disposition, ErrorCode, HeartbeatReply, PROTOCOL_VERSION,
    Registration, Welcome, WorkerMsg, now,
};
use tether_proto::{Batch, DecodeError, Seq, TaskId, WorkerId, decode_worker, encode, is_batch};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{Instant, timeout_at};

use crate::admission::{Bucket, Entry, OverEntryBudget, Peer};
use crate::auth::{SecretError, WorkerAuth};
use crate::config::{Beat, Limits};
use crate::core::registration_refusal;
use crate::core::{Counters, Event, Outgoing, SessionRef};
use crate::metrics as m;
use crate::metrics::SessionEnd;
use crate::server::AppState;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Close code for frames over the size limit.
const CLOSE_TOO_BIG: u16 = 1009;
/// Initial read buffer of a session's WebSocket. The library default (128 KiB, allocated and
/// zeroed per connection) would make 10,000 idle workers cost 1.25 GiB; worker frames are
/// small, and the buffer grows for a larger one (up to `max_frame`).
pub const WS_READ_BUFFER: usize = 512;
/// Bytes of frames a session gathers before writing them (`send_queued` flushes at the end of
/// its messages anyway). The buffer grows only as far as it is used, so an idle session keeps
/// the capacity of its largest burst, not this.
const WS_WRITE_BUFFER: usize = 16 * 1024;
/// Most queued messages sent with one flush.
const MAX_COALESCED: usize = 64;
/// Most messages a session's outgoing queue holds before the session stops reading the
/// worker's frames and writes instead. A batch frame's replies are at most two a message (an
/// `error` and the acknowledgement of each refused one): the bound is twice a full batch
/// frame's, so a session whose replies come a frame behind its reading is never held back by
/// it, while a worker that sends faster than it reads its replies backs up in its own socket,
/// not in the coordinator's memory (the core never waits on a session, so its queue has no
/// bound of its own).
const MAX_BACKLOG: usize = 4 * MAX_BATCH_MESSAGES as usize;
/// Close code for a text frame that is not UTF-8 (RFC 6455: inconsistent data).
const CLOSE_BAD_DATA: u16 = 1007;
/// Close code for a peer that broke a rule (too many frames before authentication).
const CLOSE_POLICY: u16 = 1008;
/// Close code of a failed authentication; the worker stops for good.
pub const CLOSE_UNAUTHORIZED: u16 = 4001;
/// Close code of a registration the coordinator could not check (its secret could not be
/// read); the worker reconnects with backoff.
const CLOSE_INTERNAL: u16 = 1011;
/// Close code of a session whose frames failed their integrity tag too often; the worker
/// reconnects and starts a fresh session.
const CLOSE_INTEGRITY: u16 = CLOSE_POLICY;
/// Frames a connection may send before its registration (authenticated, when authentication is
/// on), the registration aside: a frame past them that is not the registration closes the
/// connection (1008).
const PRE_AUTH_FRAMES: usize = 16;

/// `GET /api/v1/worker/{worker_id}/ws`
#[utoipa::path(
    get,
    path = "/api/v1/worker/{worker_id}/ws",
    tag = "protocol",
    params(("worker_id" = String, Path, description = "the worker's id, percent-encoded")),
    responses(
        (status = 101, description = "WebSocket session; messages in docs/PROTOCOL.md"),
        (status = 400, description = "Invalid worker id", body = crate::http::ErrorBody),
        (status = 404, description = "Not the endpoint's shape", body = crate::http::ErrorBody),
        (status = 426, description = "Not a WebSocket upgrade", body = crate::http::ErrorBody),
    )
)]
pub async fn upgrade(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    OriginalUri(uri): OriginalUri,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let worker = match parse_endpoint_path(uri.path()) {
        Ok(w) => w,
        Err(e) => {
            let status = match e {
                PathError::Shape(_) => StatusCode::NOT_FOUND,
                PathError::Id { .. } | PathError::Encoding(_) => StatusCode::BAD_REQUEST,
            };
            return crate::http::error_response(status, "bad_path", &e.to_string());
        }
    };
    let Ok(ws) = ws else {
        return crate::http::error_response(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket only",
        );
    };
    let opening = Opening {
        hold_welcome: app.cfg.auth.is_none() && is_pipelined(uri.query()),
        entry: peer.entry,
        peer: peer.addr,
    };
    // The frame limit holds for the whole session (axum sets it once); until the session has
    // registered, the connection reads only within its budget before registration.
    opening.entry.arm();
    let max = app.cfg.max_frame;
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .on_upgrade(move |socket| session(app, worker, socket, opening))
}

/// How a session starts, as its upgrade found it.
struct Opening {
    /// A worker that registers without waiting for the welcome: with no authentication asked,
    /// the welcome can wait for the registration's acknowledgement and go in its write.
    hold_welcome: bool,
    /// The connection's budget before registration, ended once the session has registered.
    entry: Arc<Entry>,
    /// The address the connection comes from, for the log lines of its registration.
    peer: std::net::SocketAddr,
}

/// Splits the socket before the session's future is made, so that the socket (moved into the
/// halves) does not take room in every idle session's state.
fn session(
    app: Arc<AppState>,
    worker: WorkerId,
    socket: WebSocket,
    opening: Opening,
) -> impl Future<Output = ()> + Send {
    let (sink, stream) = socket.split();
    let out = Tx {
        sink,
        seal: None,
        entry: opening.entry.clone(),
        stall: app.cfg.heartbeat_timeout,
    };
    // Boxed: the session's future keeps its arguments for its whole life, and the opening
    // (the peer's address alone is 32 bytes) is spent by the handshake.
    run(app, worker, out, stream, Box::new(opening))
}

/// What the handshake leaves to the session loop.
struct Opened {
    rx: crate::core::mailbox::Receiver<Outgoing>,
    open: Option<Box<Opener>>,
    agreed: Inbound,
    /// Stamped at every frame taken as the worker's (the core's view of `last_seen`).
    seen: Arc<crate::core::Seen>,
}

/// What the session accepts from its worker, as agreed by the worker's registration.
#[derive(Debug, Clone, Copy)]
struct Inbound {
    /// zstd-compressed binary frames.
    zstd: bool,
    /// Batch frames.
    batch: bool,
    /// The heartbeat cadence the worker was told last (in the welcome or a heartbeat reply).
    beat: Beat,
    /// The largest frame the worker takes, as its registration said (the protocol's default
    /// when none did; as the core keeps it in [`SessionRef::max_frame`]).
    max_frame: usize,
    /// The worker's liveness timeout as its registration stated it, ms (at least
    /// `MIN_STATED_TIMEOUT_MS`, `Registration::label_problem`; saturated at 49 days, far past
    /// any heartbeat interval); none from an older worker. In 4 bytes, not a `Duration`'s 16:
    /// every idle session keeps it.
    stated_ms: Option<NonZeroU32>,
}

impl Inbound {
    fn new(beat: Beat) -> Self {
        Self {
            zstd: false,
            batch: false,
            beat,
            max_frame: tether_proto::codec::DEFAULT_MAX_FRAME,
            stated_ms: None,
        }
    }

    fn agree(&mut self, app: &AppState, r: &Registration) {
        self.zstd = app.cfg.compression && r.compression.iter().any(|c| c == ZSTD);
        self.batch = app.cfg.batching && r.batching;
        if let Some(n) = r.max_frame {
            self.max_frame = usize::try_from(n).unwrap_or(usize::MAX);
        }
        // INVARIANT: at least `MIN_STATED_TIMEOUT_MS` when stated (a registration stating less
        // was refused, `registration_refusal`): a keepalive period of 0 would ping without end.
        self.stated_ms = r
            .heartbeat_timeout_ms
            .map(|ms| u32::try_from(ms).unwrap_or(u32::MAX))
            .and_then(NonZeroU32::new);
    }

    /// The period of the session's keepalive pings: its heartbeat interval, or a
    /// [`PINGS_PER_TIMEOUT`]th of the timeout its worker stated when that is shorter; for a
    /// worker that stated none, at most [`KEEPALIVE_EVERY`].
    fn keepalive(&self) -> Duration {
        match self.stated_ms {
            Some(ms) => {
                let stated = Duration::from_millis(u64::from(ms.get()));
                self.beat.interval.min(stated / PINGS_PER_TIMEOUT)
            }
            None => self.beat.interval.min(KEEPALIVE_EVERY),
        }
    }

    /// How long a commit holds the session's `registration_ack` up before its worker is
    /// pinged ([`awaiting_ack`]), and the acknowledgements of its messages before a
    /// heartbeat's reply comes with a ping: a heartbeat interval, or one keepalive period for
    /// a worker that stated its timeout. A worker waiting for its ack then has its first ping
    /// within two periods of the hold's start (the hold is seen at a keepalive tick), two
    /// thirds of its timeout; at a heartbeat interval, a worker whose timeout is shorter than
    /// that gave up before the first ping.
    fn ping_after(&self) -> Duration {
        match self.stated_ms {
            Some(_) => self.keepalive(),
            None => self.beat.interval,
        }
    }

    /// The cadence to tell the worker in the reply to a heartbeat, if the fleet's has moved far
    /// enough from the session's (see [`retunes`]); from then on it is this session's.
    fn retune(&mut self, app: &AppState) -> Option<Beat> {
        let now = app
            .cfg
            .beat(app.counters.sessions_open.load(Ordering::Relaxed));
        retunes(self.beat, now).then(|| {
            self.beat = now;
            now
        })
    }
}

/// Whether a session told `told` is retuned to the fleet's cadence `fleet`. A fleet grown past
/// what the session was told is over the budget, so a twentieth longer is enough; one shrunk
/// only costs detection time, so its sessions are brought back once a quarter shorter (a fleet
/// changing by a few workers does not retune every session either way).
fn retunes(told: Beat, fleet: Beat) -> bool {
    let (told, new) = (told.interval.as_secs_f64(), fleet.interval.as_secs_f64());
    new > told * OVER_BUDGET_RATIO || new * RELAX_RATIO < told
}

/// A session counted in [`Counters::sessions_open`] until dropped, however its task ends.
struct OpenSession<'a>(&'a Counters);

impl<'a> OpenSession<'a> {
    fn count(c: &'a Counters) -> Self {
        c.sessions_open.fetch_add(1, Ordering::Relaxed);
        OpenSession(c)
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.0.sessions_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How much longer the fleet's interval must be than a session's before the session, which
/// beats too often for the budget, is retuned: the budget is kept within 5 %.
const OVER_BUDGET_RATIO: f64 = 1.05;
/// How much shorter the fleet's interval must be than a session's before the session, which
/// beats less often than it could, is retuned.
const RELAX_RATIO: f64 = 1.25;

/// What the session sends to its worker, as agreed by the `registration_ack`.
#[derive(Debug, Clone, Copy)]
struct Outbound {
    zstd: bool,
    batch: Option<Batching>,
    /// Recorded messages may be acknowledged together in `acks`.
    compact_acks: bool,
    /// The largest frame the worker takes ([`Inbound::max_frame`], as of the registration
    /// read last): a batch holds at most half of it.
    worker_frame: usize,
}

impl Outbound {
    fn new(worker_frame: usize) -> Self {
        Self {
            zstd: false,
            batch: None,
            compact_acks: false,
            worker_frame,
        }
    }

    /// The most bytes of JSON in a batch frame to the worker, as the worker bounds its own
    /// batches: the agreed bound (the coordinator's, half its own `max_frame`: what it reads),
    /// and half the frame limit the worker announced, which may be smaller. The other half (16
    /// KiB at least) holds the integrity tag (65 bytes) and what zstd adds to text it cannot
    /// shrink (under 300 bytes for 64 KiB); the worker inflates the batch within its limit
    /// too. Only a message alone goes larger, and the core sends none larger than the worker's
    /// frames take (`Core::assign`, `fetch_largest`).
    fn batch_bytes(&self, agreed: &Batching) -> usize {
        usize::try_from(agreed.max_bytes)
            .unwrap_or(usize::MAX)
            .min(self.worker_frame / 2)
    }
}

/// Welcome, the wait for the registration (authenticated, when authentication is on), then the
/// session's announcement to the core with that registration. With `hold_welcome` (a worker
/// that registers first, no authentication) the welcome is only buffered: the session's first
/// write, the registration's acknowledgement, carries it (or the reply to a frame sent before
/// the registration). Once registered, the connection's budget before registration ends.
async fn handshake(
    app: &AppState,
    worker: &WorkerId,
    session_id: u64,
    out: &mut Tx,
    stream: &mut SplitStream<WebSocket>,
    opening: Box<Opening>,
) -> Option<Opened> {
    let Opening {
        hold_welcome,
        entry,
        peer,
    } = *opening;
    let timeout = app.cfg.heartbeat_timeout;
    // The welcome tells the configured cadence (a worker beats at it, or at its own when
    // shorter); a fleet over the heartbeat budget retunes it in the first heartbeat's reply.
    let beat = app.cfg.beat(0);
    let nonce = app
        .cfg
        .auth
        .as_ref()
        .map(|_| to_hex(&rand::random::<[u8; NONCE_BYTES]>()));
    let integrity = app
        .cfg
        .auth
        .as_ref()
        .filter(|a| a.message_mac)
        .map(|_| HMAC_SHA256.to_owned());
    let welcome = CoordMsg::Welcome(Welcome {
        worker_id: worker.clone(),
        protocol_version: PROTOCOL_VERSION,
        session_id,
        heartbeat_interval_ms: beat.interval.as_millis() as u64,
        heartbeat_timeout_ms: beat.timeout.as_millis() as u64,
        nonce: nonce.clone(),
        integrity,
        timestamp: now(),
    });
    let sent = match hold_welcome {
        true => {
            out.feed_framed(&mut (Instant::now() + timeout), &welcome, None, None)
                .await
        }
        false => out.send(&mut (Instant::now() + timeout), &welcome).await,
    };
    if !sent {
        return None;
    }
    // The core hears of a connection only once it registered (with authentication on, once
    // it proved who it is): a connection that never registers (a stray client, a worker's
    // redundant attempt dropped unused, an impostor) never replaces the worker's session.
    let auth = app.cfg.auth.as_ref().zip(nonce.as_deref());
    let mut conn = Conn {
        app,
        worker,
        session_id,
        peer,
        tx: out,
        stream,
    };
    let Some((registration, keyed)) = conn.await_registration(auth).await else {
        tracing::debug!(worker = %worker, session = session_id, "connection ended before it registered");
        return None;
    };
    // From here on the worker may send frames up to `max_frame`.
    entry.registered();
    // From here on every data frame both ways carries a tag.
    let open = keyed.map(|(opener, key)| {
        app.counters.mac_sessions.fetch_add(1, Ordering::Relaxed);
        out.seal = Some(Box::new(Sealer::new(key, Direction::ToWorker)));
        Box::new(opener)
    });
    let mut agreed = Inbound::new(beat);
    agreed.agree(app, &registration);
    let (tx, rx) = crate::core::mailbox::channel();
    let mut session = SessionRef::new(session_id, tx);
    session.peer = Some(peer);
    let seen = session.seen.clone();
    let connected = Event::Connected {
        worker: worker.clone(),
        session,
        registration: Box::new(registration),
    };
    match app.events.try_send(connected) {
        Ok(()) => {}
        Err(TrySendError::Closed(_)) => return None,
        // The core is held up (its writer's queue full behind a commit that waits for room):
        // the worker, waiting for its acknowledgement, is pinged meanwhile, or it would take
        // its coordinator for dead. A ping that could not be written is found by the session's
        // next write: the core knows the session once this wait is over.
        Err(TrySendError::Full(connected)) => {
            let events = app.events.clone();
            let wait: Wait<'_> = Box::pin(async move {
                let _ = events.send(connected).await;
            });
            core_wait(wait, out, agreed, &app.counters).await;
        }
    }
    out.stall = agreed.beat.timeout;
    Some(Opened {
        rx,
        open,
        agreed,
        seen,
    })
}

/// The session: handshake, then its loop until either side ends it. Not an `async fn`: one
/// keeps each argument twice in its future (the argument, and the local it is moved into), 96
/// bytes every idle session carried for nothing; an `async move` block keeps them once.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn run(
    app: Arc<AppState>,
    worker: WorkerId,
    mut out: Tx,
    mut stream: SplitStream<WebSocket>,
    opening: Box<Opening>,
) -> impl Future<Output = ()> + Send {
    async move {
        let session_id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
        // Boxed: the handshake runs once, and its state should not size every idle session.
        let Some(Opened {
            mut rx,
            mut open,
            mut agreed,
            seen,
        }) = Box::pin(handshake(
            &app,
            &worker,
            session_id,
            &mut out,
            &mut stream,
            opening,
        ))
        .await
        else {
            return;
        };
        // From here on the core knows the session: it hears of its end however the task ends.
        let departure = Departure::new(&app, &worker, session_id);
        let mut sending = Outbound::new(agreed.max_frame);
        let mut known = KnownIds::default();
        tracing::debug!(worker = %worker, session = session_id, "session open");
        metrics::counter!(m::CONNECTIONS).increment(1);
        let _open = OpenSession::count(&app.counters);
        let mut deadline = Instant::now() + agreed.beat.timeout;
        // Where the worker's last session left its rates: a reconnect is no fresh burst.
        let mut pace = app.paces.resume(&worker, &app.cfg.limits);
        // Until the core's first message (the `registration_ack`, sent once the registration's
        // reconciliation has committed, or a refusal), the worker waits for it and says
        // nothing: its silence is the coordinator's doing (see `awaiting_ack`), unless it is
        // pinged meanwhile (`pinged`) and answers none of the pings.
        let mut awaiting = true;
        let mut pinged = false;
        // One liveness timer for the session, moved lazily: every frame moves the deadline, and
        // only when the timer fires at a deadline that has since moved on is it set again (a timer
        // made per frame was registered and cancelled in the timer wheel twice a frame). Until
        // the core's first message it also times the keepalives of `awaiting_ack`.
        let liveness = tokio::time::sleep_until(Instant::now() + agreed.keepalive());
        tokio::pin!(liveness);
        // The connection's bytes read at the last frame read (of any kind), or at the last
        // keepalive (see `frame_arriving`).
        let mut read_seen = out.entry.bytes_read();
        let (end, reason): (SessionEnd, String) = loop {
            // Over its bound, the queue is written before another frame is read: a worker that
            // sends faster than it reads its replies backs up in its own socket (a worker that
            // reads nothing stalls the writes, which end the session), and the queue of a
            // session stays within a frame's replies of the bound.
            let backlog = rx.len() > MAX_BACKLOG;
            tokio::select! {
                read = frame_arriving(&out.entry, read_seen, deadline, agreed) => {
                    // A frame longer than the link carries in a heartbeat interval is arriving
                    // (a checkpoint's piece on a slow link): the worker is alive, and its
                    // heartbeats wait behind that frame, so it hears nothing to answer them.
                    // A ping tells it that its frame is being read, and keeps its session.
                    read_seen = read;
                    deadline = Instant::now() + agreed.beat.timeout;
                    seen.mark();
                    app.counters.keepalive_pings.fetch_add(1, Ordering::Relaxed);
                    // Boxed: a rare path, whose write state inline would size every idle session.
                    let sent = Box::pin(async {
                        let before = deadline;
                        let sent = out.ping(&mut deadline).await;
                        count_slow_write(&app.counters, before, deadline);
                        sent
                    });
                    if !sent.await {
                        break (SessionEnd::Error, "write failed".into());
                    }
                }
                () = &mut liveness => {
                    if awaiting {
                        // Boxed: a rare path, whose write state inline would size every idle session.
                        match Box::pin(awaiting_ack(&mut out, &mut deadline, &mut pinged, agreed, &app)).await {
                            Awaited::Kept => {
                                liveness.as_mut().reset(Instant::now() + agreed.keepalive());
                                continue;
                            }
                            Awaited::Failed => break (SessionEnd::Error, "write failed".into()),
                            // Dead as a registered worker silent for its timeout is.
                            Awaited::Silent => {}
                        }
                    } else if Instant::now() < deadline {
                        liveness.as_mut().reset(deadline);
                        continue;
                    }
                    // The last frame arrived `timeout` before the deadline.
                    let timeout = agreed.beat.timeout;
                    m::observe(m::DEAD_DETECT, Instant::now() + timeout - deadline);
                    break (SessionEnd::Timeout, format!("no frame for {} ms", timeout.as_millis()));
                }
                frame = stream.next(), if !backlog => {
                    let frame = match frame {
                        None => break (SessionEnd::Closed, "closed".into()),
                        Some(Err(e)) => {
                            if is_too_big(&e) {
                                oversize(&app.counters);
                                out.close(deadline, CLOSE_TOO_BIG, "frame exceeds the size limit").await;
                                break (SessionEnd::Oversize, "oversize frame".into());
                            }
                            if is_bad_utf8(&e) {
                                app.counters.malformed_frames.fetch_add(1, Ordering::Relaxed);
                                out.close(deadline, CLOSE_BAD_DATA, "text frame is not valid UTF-8").await;
                                break (SessionEnd::InvalidUtf8, "invalid UTF-8 in a text frame".into());
                            }
                            break (SessionEnd::Error, format!("read: {e}"));
                        }
                        Some(Ok(m)) => m,
                    };
                    // Whatever it is (a ping, a frame that fails its tag), the bytes read so far
                    // are whole frames: only a frame still arriving shows in the count now.
                    read_seen = out.entry.bytes_read();
                    #[cfg(test)]
                    tests::panic_if_asked(&worker);
                    // Over the session's message or byte rate: tell it once a second, and read
                    // nothing until both allow this frame, so a flood backs up in its own socket.
                    // What is queued for the worker is written meanwhile.
                    if let Some(over) = pace.admit(Instant::now(), &app.cfg.limits) {
                        sending.worker_frame = agreed.max_frame;
                        let queue = Queue { rx: &mut rx, sending: &mut sending, known: &mut known };
                        let paced = Box::pin(pace.wait(over, &mut out, queue, &mut deadline, &app, &worker, session_id, agreed.beat.timeout));
                        match paced.await {
                            Paced::Ready => {}
                            Paced::Failed => break (SessionEnd::Error, "write failed".into()),
                            Paced::Closed(reason) => break (SessionEnd::Coordinator, reason),
                        }
                    }
                    let frame = match unseal(open.as_deref_mut(), &frame) {
                        Ok(f) => {
                            // With integrity on, only a frame that verified is the worker: pings
                            // and pongs carry no tag, and whoever holds the connection could keep
                            // a dead worker's session (and its leases) alive with them. Until the
                            // ack, though, the worker sends nothing else: a pong is its answer
                            // to `awaiting_ack`'s pings (before, nothing at all was asked).
                            if open.is_none() || awaiting || matches!(f, Data::Text(_) | Data::Binary(_)) {
                                deadline = Instant::now() + agreed.beat.timeout;
                                seen.mark();
                            }
                            f
                        }
                        Err(e) => {
                            // Writes get their own time: the deadline did not move for this frame.
                            let mut deadline = Instant::now() + agreed.beat.timeout;
                            let failures = open.as_ref().map_or(0, |o| o.failures());
                            app.counters.mac_failures.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!(m::MAC_FAILURES).increment(1);
                            tracing::warn!(worker = %worker, session = session_id, error = %e, failures, "frame dropped: integrity tag");
                            if failures >= DEFAULT_MAX_FAILURES {
                                out.close(deadline, CLOSE_INTEGRITY, "too many frames failed their integrity tag").await;
                                break (SessionEnd::Integrity, format!("{failures} frames failed their integrity tag"));
                            }
                            let e = CoordMsg::error(ErrorCode::BadMac, format!("{e}; the frame was dropped"), None, None);
                            if !out.send_rare(&mut deadline, e).await {
                                break (SessionEnd::Error, "write failed".into());
                            }
                            continue;
                        }
                    };
                    // In a block, so the handled frame (events of hundreds of bytes) is not kept
                    // in the session's state across the awaits below.
                    if matches!(frame, Data::Text(_) | Data::Binary(_)) {
                        app.counters.frames_in.fetch_add(1, Ordering::Relaxed);
                    }
                    let told = agreed.beat.timeout;
                    // Every frame is charged to the byte rate by its text as decoded: inflating and
                    // parsing are what it costs.
                    let handled = match frame {
                        Data::Text(t) => {
                            pace.charge_bytes(t.len(), &app.cfg.limits);
                            on_text(&app, &worker, session_id, t, &mut agreed, &known, &seen)
                        }
                        Data::Binary(b) if agreed.zstd => match inflate(b, app.cfg.max_frame) {
                            Ok(t) => {
                                pace.charge_bytes(t.len(), &app.cfg.limits);
                                let c = &app.counters;
                                c.compressed_in_frames.fetch_add(1, Ordering::Relaxed);
                                c.compressed_in_wire_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                                c.compressed_in_json_bytes.fetch_add(t.len() as u64, Ordering::Relaxed);
                                on_text(&app, &worker, session_id, &t, &mut agreed, &known, &seen)
                            }
                            Err(InflateError::TooBig { .. }) => {
                                app.counters.decompression_refused.fetch_add(1, Ordering::Relaxed);
                                oversize(&app.counters);
                                // Hostile or broken: a worker's own frames never inflate past
                                // the limit it was told. Once a window per worker at WARN.
                                let said = app.refusals.note(worker.as_str(), "decompression bomb");
                                if said.warn {
                                    tracing::warn!(worker = %worker, session = session_id, wire_bytes = b.len(), limit = app.cfg.max_frame, repeats_at_debug = said.repeats, "a compressed frame inflates past the frame limit (a decompression bomb?): closing with 1009");
                                } else {
                                    tracing::debug!(worker = %worker, session = session_id, wire_bytes = b.len(), repeat = said.repeats, "a compressed frame inflates past the frame limit again: closing with 1009");
                                }
                                out.close(deadline, CLOSE_TOO_BIG, "compressed frame inflates past the size limit").await;
                                break (SessionEnd::Oversize, "compressed frame inflates past the size limit".into());
                            }
                            Err(e) => {
                                // What it inflated before failing is not known: up to the limit.
                                pace.charge_bytes(app.cfg.max_frame, &app.cfg.limits);
                                app.counters.malformed_frames.fetch_add(1, Ordering::Relaxed);
                                Handled::reply(CoordMsg::error(ErrorCode::BadFrame, e.to_string(), None, None))
                            }
                        },
                        Data::Binary(b) => {
                            pace.charge_bytes(b.len(), &app.cfg.limits);
                            Handled::reply(CoordMsg::error(
                                ErrorCode::BadFrame,
                                "binary frames are not accepted without negotiated compression",
                                None,
                                None,
                            ))
                        }
                        Data::Close => break (SessionEnd::Closed, "closed by worker".into()),
                        Data::Control => Handled::default(),
                    };
                    // A heartbeat's reply may have retuned the session's cadence: a longer timeout
                    // counts from this frame too (a shorter one from the next).
                    deadline += agreed.beat.timeout.saturating_sub(told);
                    out.stall = agreed.beat.timeout;
                    let Handled { replies, wait, messages } = handled;
                    // A batch counts against the message rate by its messages: what it saves is
                    // per frame, not a licence to send more.
                    pace.charge_messages(messages.saturating_sub(1), &app.cfg.limits);
                    if let Some(wait) = wait {
                        if !Box::pin(core_wait(wait, &mut out, agreed, &app.counters)).await {
                            break (SessionEnd::Error, "write failed".into());
                        }
                        // The wait was the coordinator's slowness, not the worker's silence: the
                        // worker has its whole timeout from now (it may have sent nothing, its
                        // frames unread behind this one).
                        deadline = deadline.max(Instant::now() + agreed.beat.timeout);
                    }
                    // Boxed (an allocation per reply): inline, the write's state would size every
                    // idle session's future.
                    // A heartbeat is answered here, but what the worker sent before it waits for
                    // its acknowledgement behind a commit that is held up (out of space, a disk
                    // that does not answer): a ping with the reply tells the worker that the
                    // coordinator has it, or it would take the silence for a link that lost its
                    // frames and reconnect, to wait again at registration. The hold that earns
                    // the ping is `ping_after`'s, as for a worker awaiting its ack: a keepalive
                    // period for a worker that stated its timeout (it takes a message
                    // unacknowledged for that long as lost: at a heartbeat interval, one whose
                    // timeout is shorter gave up before the first ping), a heartbeat interval for
                    // one that stated none (its timeout unknown; `keepalive`'s 250 ms would add a
                    // ping to every such worker's replies through any commit that long).
                    let held = replies.iter().any(|r| matches!(r, CoordMsg::Heartbeat(_)))
                        && app.store_stats.held_for().is_some_and(|h| h >= agreed.ping_after());
                    let sent = (!replies.is_empty()).then(|| Box::pin(async {
                        let before = deadline;
                        let mut sent = out.send_all(&mut deadline, &replies).await;
                        if sent && held {
                            app.counters.keepalive_pings.fetch_add(1, Ordering::Relaxed);
                            sent = out.ping(&mut deadline).await;
                        }
                        count_slow_write(&app.counters, before, deadline);
                        sent
                    }));
                    if let Some(sent) = sent && !sent.await {
                        break (SessionEnd::Error, "write failed".into());
                    }
                }
                queued = rx.recv() => match queued {
                    Some(Outgoing::Close(c)) => {
                        let (code, reason) = *c;
                        out.close(deadline, code, &reason).await;
                        break (SessionEnd::Coordinator, format!("closed by coordinator: {reason}"));
                    }
                    Some(first) => {
                        // Held back for the queue, the worker's frames wait unread: its silence
                        // meanwhile is the session's doing. So it was until the core's first
                        // message: the worker has its whole timeout from its acknowledgement.
                        if backlog || std::mem::take(&mut awaiting) {
                            deadline = deadline.max(Instant::now() + agreed.beat.timeout);
                        }
                        // A registration read since the last write may have announced
                        // another frame limit.
                        sending.worker_frame = agreed.max_frame;
                        // Boxed: its state (the batch, the frames being fed) is the largest of the
                        // session's awaits, and inline it would size every idle session.
                        let send = Box::pin(send_queued(&mut out, &mut rx, first, &mut deadline, &mut sending, &mut known, &app));
                        match send.await {
                            Ok(None) => {}
                            Ok(Some((code, reason))) => {
                                out.close(deadline, code, &reason).await;
                                break (SessionEnd::Coordinator, format!("closed by coordinator: {reason}"));
                            }
                            Err(()) => break (SessionEnd::Error, "write failed".into()),
                        }
                    }
                    None => break (SessionEnd::Coordinator, "core stopped".into()),
                },
            }
        };
        tracing::info!(worker = %worker, session = session_id, %reason, "session ended");
        metrics::counter!(m::SESSIONS_ENDED, "reason" => end.as_str()).increment(1);
        app.paces.keep(&worker, pace, &app.cfg.limits);
        // Boxed: inline, the wait's state would size every idle session's future.
        Box::pin(departure.leave()).await;
    }
}

/// Counts a write that outlasted the session's liveness deadline, `before` it, because the
/// connection kept taking bytes: [`while_draining`] moved the deadline to `after`.
fn count_slow_write(c: &Counters, before: Instant, after: Instant) {
    if after != before {
        c.slow_writes.fetch_add(1, Ordering::Relaxed);
    }
}

/// How often, at most, a worker kept waiting (its `registration_ack` behind a held commit, its
/// frames unread behind a busy core, a frame of it still arriving) is pinged when its
/// registration stated no liveness timeout (an older worker): every heartbeat interval of the
/// session, but no less often than this. Such a worker may beat faster than the coordinator
/// and time out sooner (its timeout is its own), and never says by how much. A worker that
/// states it is pinged by it ([`PINGS_PER_TIMEOUT`]): 10,000 workers waiting behind a commit
/// held up for want of disk took 40,000 pings a second at this period; at a third of the Rust
/// worker's 15 s timeout (bounded by the default 5 s interval), 2,000.
const KEEPALIVE_EVERY: Duration = Duration::from_millis(250);

/// Keepalive periods in a worker's stated liveness timeout (the period is a third of it): after
/// any frame the worker takes, two more pings are due before its deadline, the second a third
/// of its timeout early, so one ping lost or held up (behind a write into a slow link, a timer
/// late on a loaded host) still leaves the worker alive. At a half, one late ping ended it.
const PINGS_PER_TIMEOUT: u32 = 3;

/// What a keepalive period of a session awaiting its `registration_ack` found.
enum Awaited {
    /// The session goes on.
    Kept,
    /// The worker answered none of the pings for its heartbeat timeout: it is gone.
    Silent,
    /// A ping could not be written.
    Failed,
}

/// A keepalive period of a session whose worker waits for its `registration_ack`. The ack is
/// sent once the registration's reconciliation has committed (nothing is acknowledged before
/// it is durable), and the worker says nothing until it comes: its silence is not counted
/// (`deadline` moves on). While the store is held on a commit for [`Inbound::ping_after`] or
/// more (out of space, a disk that does not answer) the worker is pinged too: the coordinator did
/// not answer it for so long that it took the silence for a dead link, gave the registration
/// up at its heartbeat timeout and connected again, to wait again, for as long as the commit
/// was held. Pinged (`pinged`), the worker answers (a pong, which moves `deadline` as any
/// frame does), so from the first ping its silence counts again: a worker that answers none
/// for its heartbeat timeout is gone ([`Awaited::Silent`]: a pulled cable closes no TCP
/// connection), and was kept until the commit went through, however long the disk stayed
/// full.
async fn awaiting_ack(
    out: &mut Tx,
    deadline: &mut Instant,
    pinged: &mut bool,
    agreed: Inbound,
    app: &AppState,
) -> Awaited {
    let beat = agreed.beat;
    let held = app
        .store_stats
        .held_for()
        .is_some_and(|h| h >= agreed.ping_after());
    if !held {
        *pinged = false;
        *deadline = (*deadline).max(Instant::now() + beat.timeout);
        return Awaited::Kept;
    }
    if !std::mem::replace(pinged, true) {
        // The first ping: the worker has its whole timeout from it to answer.
        *deadline = (*deadline).max(Instant::now() + beat.timeout);
    } else if Instant::now() >= *deadline {
        return Awaited::Silent;
    }
    app.counters.keepalive_pings.fetch_add(1, Ordering::Relaxed);
    let before = *deadline;
    let sent = out.ping(deadline).await;
    count_slow_write(&app.counters, before, *deadline);
    match sent {
        true => Awaited::Kept,
        false => Awaited::Failed,
    }
}

/// A frame over the size limit (as sent, or once inflated): counted in the overview's
/// counters and in `tether_oversize_frames_total`, whichever way it came.
fn oversize(counters: &Counters) {
    counters.oversize_frames.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(m::OVERSIZE_FRAMES).increment(1);
}

/// Waits for the core to take a session's events (`wait`: its queue was full), pinging the
/// worker every keepalive period of the session ([`Inbound::keepalive`]) meanwhile. The
/// session reads nothing while it waits, so the worker's heartbeats go unanswered; without the
/// pings a core held up for longer than the worker's timeout (a store out of space, its queue
/// backed up to every session) had every worker take its coordinator for dead, reconnect, and
/// wait again at registration. False when a ping could not be written: the session is over,
/// once the core has taken what was read (the events are the worker's, and whole).
async fn core_wait(wait: Wait<'_>, out: &mut Tx, agreed: Inbound, counters: &Counters) -> bool {
    let (every, beat) = (agreed.keepalive(), agreed.beat);
    let mut wait = wait;
    let mut pinging = true;
    let mut next = Instant::now() + every;
    loop {
        tokio::select! {
            () = &mut wait => return pinging,
            () = tokio::time::sleep_until(next), if pinging => {
                let mut deadline = Instant::now() + beat.timeout;
                pinging = out.ping(&mut deadline).await;
                counters.keepalive_pings.fetch_add(1, Ordering::Relaxed);
                next = Instant::now() + every;
            }
        }
    }
}

/// Ready with the connection's count of bytes read once bytes came since `read_seen` (the
/// count at the worker's last frame, or at the last keepalive) and no frame has completed for
/// a keepalive period of the session ([`Inbound::keepalive`]; `deadline` is the last one's time plus
/// the timeout): a frame is arriving slower than the worker's heartbeats would. Never wakes
/// the task itself: it is polled whenever the session wakes, and a frame arriving wakes it
/// with each read, so an idle session pays nothing for it and a busy one an atomic load a
/// wake.
///
/// Bytes of whole frames do not count (`read_seen` moves at every frame read, whatever it is):
/// with integrity tags, pings, pongs and frames that fail their tags keep no session alive.
/// A frame that keeps arriving and never completes does, bounded only by the frame size limit
/// (docs/SECURITY.md).
fn frame_arriving(
    entry: &Entry,
    read_seen: u64,
    deadline: Instant,
    agreed: Inbound,
) -> impl Future<Output = u64> + '_ {
    let every = agreed.keepalive();
    let due = deadline - agreed.beat.timeout.saturating_sub(every);
    std::future::poll_fn(move |_| {
        let read = entry.bytes_read();
        match read != read_seen && Instant::now() >= due {
            true => std::task::Poll::Ready(read),
            false => std::task::Poll::Pending,
        }
    })
}

/// Tells the core that a session it knows has ended, however the session's task ends: by
/// [`Departure::leave`] when it returns, from its drop when it panicked or was dropped
/// (cancelled) first. Without it a panic in a session left its worker `connected` for ever,
/// its leases never requeued. One pointer in the session's state (every idle session keeps
/// it): the queue and the event it will hand over are boxed.
struct Departure(Option<Box<(mpsc::Sender<Event>, Event)>>);

impl Departure {
    fn new(app: &AppState, worker: &WorkerId, session_id: u64) -> Self {
        let ev = Event::Disconnected {
            worker: worker.clone(),
            session_id,
        };
        Self(Some(Box::new((app.events.clone(), ev))))
    }

    /// Waits for room in the core's queue and hands it the disconnect. Dropped while waiting,
    /// the guard still holds it (`reserve` takes nothing until it has the room).
    async fn leave(mut self) {
        let Some(events) = self.0.as_ref().map(|b| b.0.clone()) else {
            return;
        };
        // A closed queue: the core has stopped, nobody to tell.
        if let (Ok(permit), Some(told)) = (events.reserve().await, self.0.take()) {
            permit.send(told.1);
        }
        self.0 = None;
    }
}

impl Drop for Departure {
    fn drop(&mut self) {
        let Some(told) = self.0.take() else {
            return;
        };
        let (events, ev) = *told;
        if let Event::Disconnected { worker, session_id } = &ev {
            tracing::warn!(worker = %worker, session = session_id, "session task ended abruptly; the core is told of its end");
        }
        let ev = match events.try_send(ev) {
            Ok(()) | Err(TrySendError::Closed(_)) => return,
            Err(TrySendError::Full(ev)) => ev,
        };
        // The queue is full and a drop cannot wait: a task of its own waits for room. It ends
        // once the core takes the event, or at once when the core has stopped.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _ = events.send(ev).await;
                });
            }
            Err(_) => tracing::error!("no runtime to tell the core of a session's end"),
        }
    }
}

/// The rates of each worker: shared by its sessions while any is open (a worker that
/// reconnects while its previous session is still open, which is the usual reconnect, takes
/// the same buckets, not a fresh burst), and kept after its last session ended with less than
/// a full burst saved up, until they are full again: a worker that reconnects carries on where
/// it was (a reconnect was worth a burst of 4,000 messages and 256 MiB).
#[derive(Default)]
pub struct Paces(std::sync::Mutex<PaceMap>);

#[derive(Default)]
struct PaceMap {
    by_worker: HashMap<WorkerId, Arc<std::sync::Mutex<Pace>>>,
    /// The size at which the next sweep of full, unused paces runs: at least
    /// [`PACES_SWEPT_AT`], and twice what the last sweep kept (so a fleet of many workers,
    /// each with an open session, does not sweep the whole map at every session's end).
    sweep_at: usize,
}

/// Paces kept before the full ones are swept out.
const PACES_SWEPT_AT: usize = 4096;

impl Paces {
    fn map(&self) -> std::sync::MutexGuard<'_, PaceMap> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn resume(&self, worker: &WorkerId, limits: &Limits) -> SessionPace {
        let shared = self
            .map()
            .by_worker
            .entry(worker.clone())
            .or_insert_with(|| Arc::new(std::sync::Mutex::new(Pace::new(limits))))
            .clone();
        SessionPace { shared, told: None }
    }

    /// The session's end: its worker's rates are forgotten once no session uses them and
    /// they are full (the next session would start full all the same).
    fn keep(&self, worker: &WorkerId, pace: SessionPace, limits: &Limits) {
        drop(pace);
        let now = Instant::now();
        let unused_and_full = |p: &Arc<std::sync::Mutex<Pace>>| {
            Arc::strong_count(p) == 1 && lock(p).full(now, limits)
        };
        let mut map = self.map();
        if map.by_worker.get(worker).is_some_and(unused_and_full) {
            map.by_worker.remove(worker);
        }
        if map.by_worker.len() >= map.sweep_at.max(PACES_SWEPT_AT) {
            map.by_worker.retain(|_, p| !unused_and_full(p));
            map.sweep_at = 2 * map.by_worker.len();
        }
    }
}

fn lock(p: &std::sync::Mutex<Pace>) -> std::sync::MutexGuard<'_, Pace> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// A session's hold on its worker's rates, and when the session last told the worker it is
/// over one.
struct SessionPace {
    shared: Arc<std::sync::Mutex<Pace>>,
    told: Option<Instant>,
}

/// A worker's rates: messages a second, and bytes a second of its frames' text as decoded
/// (after inflating, for a compressed frame), each a token bucket. A frame is read and then
/// handled once both have room; the bytes are charged after decoding, into debt if need be (at
/// most one frame's, `max_frame`), and the next frame waits until the debt is paid. So a
/// worker never costs more inflating and parsing than the byte rate allows, over any span,
/// by more than its burst and one frame.
struct Pace {
    messages: Bucket,
    bytes: Bucket,
}

/// The rate a frame has to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    Messages,
    Bytes,
}

impl Pace {
    fn new(limits: &Limits) -> Self {
        Self {
            messages: Bucket::full(limits.message_rate()),
            bytes: Bucket::full(limits.byte_rate()),
        }
    }

    /// Takes the frame's message token when both rates have room now; else the one that has
    /// not.
    fn admit(&mut self, now: Instant, limits: &Limits) -> Option<Over> {
        if !self.bytes.ready(now, limits.byte_rate()) {
            return Some(Over::Bytes);
        }
        if !self.messages.take(now, limits.message_rate()) {
            return Some(Over::Messages);
        }
        None
    }

    /// Whether both buckets are full by `now`: nothing to remember.
    fn full(&mut self, now: Instant, limits: &Limits) -> bool {
        self.messages.is_full(now, limits.message_rate())
            && self.bytes.is_full(now, limits.byte_rate())
    }
}

impl SessionPace {
    fn admit(&mut self, now: Instant, limits: &Limits) -> Option<Over> {
        lock(&self.shared).admit(now, limits)
    }

    /// Charges a frame's decoded bytes.
    fn charge_bytes(&mut self, n: usize, limits: &Limits) {
        lock(&self.shared)
            .bytes
            .charge(n as u64, limits.byte_rate());
    }

    /// Charges a frame's messages past its first (taken by [`Pace::admit`]).
    fn charge_messages(&mut self, n: u32, limits: &Limits) {
        if n > 0 {
            lock(&self.shared)
                .messages
                .charge(u64::from(n), limits.message_rate());
        }
    }

    /// Waits, counted and telling the worker at most once a second, until both rates have
    /// room for the frame (its message token taken), writing what `queue` holds meanwhile
    /// (the acks of the frames before: a paced worker still hears of them, and a session's
    /// queue is not left to grow while it waits). Boxed by the caller: a rare path, whose state
    /// would size every idle session's future.
    #[expect(
        clippy::too_many_arguments,
        reason = "the session's parts the wait writes with"
    )]
    async fn wait(
        &mut self,
        mut over: Over,
        out: &mut Tx,
        queue: Queue<'_>,
        deadline: &mut Instant,
        app: &AppState,
        worker: &WorkerId,
        session_id: u64,
        timeout: Duration,
    ) -> Paced {
        let Queue { rx, sending, known } = queue;
        let mut open = true;
        let limits = &app.cfg.limits;
        let mut counted = [false; 2];
        loop {
            let (counter, per_sec, unit) = match over {
                Over::Messages => (
                    &app.counters.rate_limited,
                    limits.messages_per_sec,
                    "messages",
                ),
                Over::Bytes => (&app.counters.bytes_limited, limits.bytes_per_sec, "bytes"),
            };
            // A frame is counted once for each rate it waited for.
            if !std::mem::replace(&mut counted[over as usize], true) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            if self
                .told
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                self.told = Some(Instant::now());
                tracing::warn!(worker = %worker, session = session_id, rate = ?over, "worker exceeds its rate");
                let e = CoordMsg::error(
                    ErrorCode::RateLimited,
                    format!("more than {per_sec} {unit} per second; slow down"),
                    None,
                    None,
                );
                if !out.send(&mut (Instant::now() + timeout), &e).await {
                    return Paced::Failed;
                }
            }
            let ready_at = {
                let pace = lock(&self.shared);
                match over {
                    Over::Messages => pace.messages.next_token_at(limits.message_rate()),
                    Over::Bytes => pace.bytes.next_token_at(limits.byte_rate()),
                }
            };
            let sleep = tokio::time::sleep_until(ready_at);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    biased;
                    () = &mut sleep => break,
                    queued = rx.recv(), if open => match queued {
                        Some(Outgoing::Close(c)) => {
                            let (code, reason) = *c;
                            return Paced::close(out, *deadline, code, reason).await;
                        }
                        Some(first) => {
                            let send = send_queued(out, rx, first, deadline, sending, known, app);
                            match Box::pin(send).await {
                                Ok(None) => {}
                                Ok(Some((code, reason))) => {
                                    return Paced::close(out, *deadline, code, reason).await;
                                }
                                Err(()) => return Paced::Failed,
                            }
                        }
                        // The core has stopped: the session learns it once the wait is over.
                        None => open = false,
                    },
                }
            }
            match self.admit(Instant::now(), limits) {
                None => return Paced::Ready,
                Some(next) => over = next,
            }
        }
    }
}

/// The session's outgoing queue and what writing it needs, lent to a wait.
struct Queue<'a> {
    rx: &'a mut crate::core::mailbox::Receiver<Outgoing>,
    sending: &'a mut Outbound,
    known: &'a mut KnownIds,
}

/// How a wait for the session's rates ended.
enum Paced {
    /// The frame may be handled.
    Ready,
    /// A write failed or stalled.
    Failed,
    /// The coordinator closed the session (the close sent), for this reason.
    Closed(String),
}

impl Paced {
    async fn close(out: &mut Tx, deadline: Instant, code: u16, reason: String) -> Self {
        out.close(deadline, code, &reason).await;
        Paced::Closed(format!("closed by coordinator: {reason}"))
    }
}

/// What a frame asks of its session: replies to send, and the wait for room in the core's
/// queue when it was full.
#[derive(Default)]
struct Handled<'a> {
    replies: Vec<CoordMsg>,
    wait: Option<Wait<'a>>,
    /// Messages the frame carried.
    messages: u32,
}

impl Handled<'_> {
    fn reply(m: CoordMsg) -> Self {
        Self {
            replies: vec![m],
            ..Self::default()
        }
    }
}

/// Hands events to the core in order. Once its queue is full, the rest wait in `pending` for
/// a boxed wait: it happens under backpressure only, and events (hundreds of bytes each) held
/// in the session's own state would size every idle session.
struct Forward<'a> {
    app: &'a AppState,
    pending: Vec<Event>,
}

impl<'a> Forward<'a> {
    fn new(app: &'a AppState) -> Self {
        Self {
            app,
            pending: Vec::new(),
        }
    }

    fn send(&mut self, ev: Event) {
        if !self.pending.is_empty() {
            self.pending.push(ev);
            return;
        }
        match self.app.events.try_send(ev) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(ev)) => self.pending.push(ev),
        }
    }

    fn wait(self) -> Option<Wait<'a>> {
        let (app, pending) = (self.app, self.pending);
        (!pending.is_empty()).then(|| -> Wait<'a> {
            Box::pin(async move {
                for ev in pending {
                    let _ = app.events.send(ev).await;
                }
            })
        })
    }
}

/// A boxed wait of a session.
type Wait<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Decodes a frame (one message, or a batch once agreed); heartbeats are answered here,
/// everything else goes to the core in order.
fn on_text<'a>(
    app: &'a AppState,
    worker: &WorkerId,
    session_id: u64,
    text: &str,
    agreed: &mut Inbound,
    known: &KnownIds,
    seen: &crate::core::Seen,
) -> Handled<'a> {
    let mut h = Handled::default();
    let mut fwd = Forward::new(app);
    let mut frame = FrameEvents::new(worker, session_id);
    let mut each = |mut decoded: Result<WorkerMsg, DecodeError>, agreed: &mut Inbound| {
        h.messages += 1;
        if let Some(id) = decoded.as_mut().ok().and_then(WorkerMsg::task_id_mut) {
            known.share(id);
        }
        if let Some(reply) = on_message(app, worker, session_id, decoded, agreed, &mut frame, seen)
        {
            h.replies.push(reply);
        }
        if let Some(ev) = frame.full() {
            fwd.send(ev);
        }
    };
    if !is_batch(text) {
        each(decode_worker(text), agreed);
    } else if !agreed.batch {
        app.counters
            .malformed_frames
            .fetch_add(1, Ordering::Relaxed);
        return Handled::reply(CoordMsg::error(
            ErrorCode::BadFrame,
            "batch frames are accepted only when agreed at registration",
            None,
            None,
        ));
    } else if let Some(most) = app
        .cfg
        .batching()
        .map(|b| b.max_bytes)
        .filter(|&most| text.len() as u64 > most)
    {
        // The bound the ack announced: a worker that keeps to it never sends more.
        app.counters
            .malformed_frames
            .fetch_add(1, Ordering::Relaxed);
        return Handled::reply(CoordMsg::error(
            ErrorCode::BadFrame,
            format!(
                "a batch of {} bytes exceeds the agreed batching.max_bytes of {most}",
                text.len()
            ),
            None,
            None,
        ));
    } else {
        match decode_worker_batch(text, MAX_BATCH_MESSAGES) {
            Ok(messages) => {
                app.counters.batch_frames_in.fetch_add(1, Ordering::Relaxed);
                for m in messages {
                    each(m, agreed);
                }
            }
            Err(e) => return Handled::reply(decode_error(app, worker, &e)),
        }
    }
    if let Some(ev) = frame.rest() {
        fwd.send(ev);
    }
    h.wait = fwd.wait();
    h
}

/// A frame's messages for the core, gathered into events of up to
/// [`FRAME_EVENT_MESSAGES`](crate::core::FRAME_EVENT_MESSAGES): one hand-over and one lookup of
/// the session for a frame's messages instead of one each.
struct FrameEvents<'a> {
    worker: &'a WorkerId,
    session_id: u64,
    msgs: Vec<WorkerMsg>,
}

impl<'a> FrameEvents<'a> {
    fn new(worker: &'a WorkerId, session_id: u64) -> Self {
        Self {
            worker,
            session_id,
            msgs: Vec::new(),
        }
    }

    fn push(&mut self, msg: WorkerMsg) {
        self.msgs.push(msg);
    }

    /// The event of the messages gathered, once there are as many as an event carries.
    fn full(&mut self) -> Option<Event> {
        if self.msgs.len() < crate::core::FRAME_EVENT_MESSAGES {
            return None;
        }
        self.rest()
    }

    /// The event of whatever is gathered.
    fn rest(&mut self) -> Option<Event> {
        (!self.msgs.is_empty()).then(|| Event::Frame {
            worker: self.worker.clone(),
            session_id: self.session_id,
            msgs: std::mem::take(&mut self.msgs),
        })
    }
}

/// The task ids of the assignments a session sent last, as the core holds them. An id received
/// from the worker is replaced by its copy here, so that the core's lookups by it compare
/// addresses: compared by text, a freshly decoded id made every lookup load the text of the
/// map's key, a cache miss a message (2 % of the coordinator's samples under a flood).
#[derive(Default)]
struct KnownIds(std::collections::VecDeque<TaskId>);

impl KnownIds {
    /// Ids remembered, newest last: as many tasks as a worker of the stress scenarios runs.
    const CAP: usize = 16;

    fn remember(&mut self, id: &TaskId) {
        if self.0.len() == Self::CAP {
            self.0.pop_front();
        }
        self.0.push_back(id.clone());
    }

    /// Replaces `id` by the remembered copy of the same text, if there is one.
    fn share(&self, id: &mut TaskId) {
        if let Some(k) = self.0.iter().rev().find(|k| *k == id) {
            *id = k.clone();
        }
    }
}

/// One decoded message: a heartbeat or a refusal is answered (returned), anything else goes
/// to the core.
fn on_message(
    app: &AppState,
    worker: &WorkerId,
    session_id: u64,
    decoded: Result<WorkerMsg, DecodeError>,
    agreed: &mut Inbound,
    frame: &mut FrameEvents<'_>,
    seen: &crate::core::Seen,
) -> Option<CoordMsg> {
    if let Ok(msg) = &decoded {
        m::MESSAGES_IN_BY_TYPE.increment(msg.type_name());
    }
    match decoded {
        Ok(WorkerMsg::Heartbeat(h)) => {
            let mut reply = HeartbeatReply::answering(h.sequence);
            reply.draining = seen.drained();
            if let Some(beat) = agreed.retune(app) {
                reply.heartbeat_interval_ms = Some(beat.interval.as_millis() as u64);
                reply.heartbeat_timeout_ms = Some(beat.timeout.as_millis() as u64);
            }
            Some(CoordMsg::Heartbeat(reply))
        }
        Ok(WorkerMsg::Registration(_)) if app.cfg.auth.is_some() => {
            app.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
            m::Refused::Unauthorized.count();
            tracing::warn!(worker = %worker, session = session_id, "second registration on an authenticated session refused");
            Some(CoordMsg::error(
                ErrorCode::Unauthorized,
                "this session has authenticated already and its nonce is used; reconnect to register again",
                Some("registration".into()),
                None,
            ))
        }
        // A session's terms are agreed once, by the registration it was admitted with: one
        // again goes to the core, which refuses it (`unexpected`) and changes nothing, so it
        // changes none of the session's terms either (compression, batches, frame size).
        Ok(msg) => {
            frame.push(msg);
            None
        }
        Err(e) => Some(decode_error(app, worker, &e)),
    }
}

/// The structured reply to an undecodable frame, counted.
fn decode_error(app: &AppState, worker: &WorkerId, e: &DecodeError) -> CoordMsg {
    let code = match e {
        DecodeError::UnknownType { .. } => {
            app.counters.unknown_frames.fetch_add(1, Ordering::Relaxed);
            ErrorCode::UnknownType
        }
        DecodeError::Malformed { .. } => {
            app.counters
                .malformed_frames
                .fetch_add(1, Ordering::Relaxed);
            ErrorCode::BadFrame
        }
    };
    tracing::debug!(worker = %worker, error = %e, "undecodable frame");
    CoordMsg::error(code, e.to_string(), e.offending_type(), e.seq())
}

/// The longest a connection may take to deliver its registration while its bytes keep
/// coming (a large inventory over a crawling link); without bytes, the heartbeat timeout.
pub const PRE_REGISTRATION_MOST: Duration = Duration::from_secs(120);

/// A connection before it is handed to the core.
struct Conn<'a> {
    app: &'a AppState,
    worker: &'a WorkerId,
    session_id: u64,
    peer: std::net::SocketAddr,
    tx: &'a mut Tx,
    stream: &'a mut SplitStream<WebSocket>,
}

/// A registration (verified, with authentication on), with the opener that verified it (frame
/// 0) and the session key when the session carries integrity tags.
type Registered = (Registration, Option<(Opener, SessionKey)>);

impl Conn<'_> {
    /// Waits for the connection's registration: with `auth` (the worker authentication and this
    /// connection's nonce), one whose signature answers the nonce (and, with per-message
    /// integrity, whose frame carries a tag under the session key). Heartbeats are answered, a
    /// worker's `error` is logged, anything else is refused; silence past the heartbeat
    /// timeout, too many frames or a failed check end the connection (a failed check with
    /// `error` `unauthorized` and close 4001).
    async fn await_registration(
        &mut self,
        auth: Option<(&WorkerAuth, &str)>,
    ) -> Option<Registered> {
        let timeout = self.app.cfg.heartbeat_timeout;
        let mut deadline = Instant::now() + timeout;
        // A frame still arriving when the deadline comes (a registration larger than the link
        // carries in a timeout) is waited for, a timeout at a time while its bytes come, up
        // to `PRE_REGISTRATION_MOST` in all: past registration a slow frame keeps its session,
        // and a registration cut short was sent again, and cut again, for ever.
        let most = Instant::now() + PRE_REGISTRATION_MOST.max(timeout);
        let mut read_seen = self.tx.entry.bytes_read();
        let counters = &self.app.counters;
        // The frames allowed, and the registration after them.
        for read in 0..=PRE_AUTH_FRAMES {
            let next = loop {
                match timeout_at(deadline, self.stream.next()).await {
                    Ok(next) => break next,
                    Err(_) => {
                        let read = self.tx.entry.bytes_read();
                        if read == read_seen || Instant::now() >= most {
                            return None;
                        }
                        read_seen = read;
                        deadline = (Instant::now() + timeout).min(most);
                    }
                }
            };
            read_seen = self.tx.entry.bytes_read();
            let frame = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) if is_too_big(&e) => {
                    oversize(counters);
                    self.close(deadline, CLOSE_TOO_BIG, "frame exceeds the size limit")
                        .await;
                    return None;
                }
                Some(Err(e)) if is_bad_utf8(&e) => {
                    counters.malformed_frames.fetch_add(1, Ordering::Relaxed);
                    self.close(deadline, CLOSE_BAD_DATA, "text frame is not valid UTF-8")
                        .await;
                    return None;
                }
                // Counted where it was read (`pre_registration_overflows`); what was read of
                // the frame is dropped, and the socket is closed, so this close may not arrive.
                Some(Err(e)) if is_over_entry_budget(&e) => {
                    tracing::debug!(worker = %self.worker, session = self.session_id, "connection read too much before its registration");
                    self.close(deadline, CLOSE_POLICY, "too many bytes before registration")
                        .await;
                    return None;
                }
                _ => return None,
            };
            if matches!(frame, Message::Text(_) | Message::Binary(_)) {
                counters.frames_in.fetch_add(1, Ordering::Relaxed);
            }
            let reply = match frame {
                Message::Text(t) if is_batch(t.as_str()) => {
                    counters.malformed_frames.fetch_add(1, Ordering::Relaxed);
                    CoordMsg::error(
                        ErrorCode::BadFrame,
                        "batch frames are accepted only when agreed at registration",
                        None,
                        None,
                    )
                }
                // A tagged registration is read before its key exists: the key needs its
                // client nonce. Nothing in it is trusted until the signature and tag verify.
                Message::Text(t) => match decode_worker(match auth {
                    Some(_) => integrity::peek_text(t.as_str()),
                    None => t.as_str(),
                }) {
                    Ok(msg) => {
                        m::MESSAGES_IN_BY_TYPE.increment(msg.type_name());
                        match msg {
                            WorkerMsg::Registration(r) => {
                                return self.admit(auth, deadline, r, t.as_str()).await;
                            }
                            WorkerMsg::Heartbeat(h) => {
                                CoordMsg::Heartbeat(HeartbeatReply::answering(h.sequence))
                            }
                            // Never answered: an error for an error could go back and forth.
                            WorkerMsg::Error(e) => {
                                metrics::counter!(m::ERRORS, "code" => e.code.as_str(), "direction" => "received").increment(1);
                                // Once a window per worker at WARN: the core's budget of
                                // peers' lines is for registered sessions, and a connection
                                // may send these until its frames run out, then come back.
                                let said = self
                                    .app
                                    .refusals
                                    .note(self.worker.as_str(), "error before registration");
                                if said.warn {
                                    tracing::warn!(worker = %self.worker, session = self.session_id, code = e.code.as_str(), error_message = ?e.logged(), repeats_at_debug = said.repeats, "worker reported an error before registering (its repeats within 10 min are logged at debug; `repeats_at_debug` counts those of the last window)");
                                } else {
                                    tracing::debug!(worker = %self.worker, session = self.session_id, code = e.code.as_str(), error_message = ?e.logged(), repeat = said.repeats, "worker reported an error before registering, again");
                                }
                                continue;
                            }
                            other => CoordMsg::error(
                                ErrorCode::Unexpected,
                                match auth {
                                    Some(_) => "authenticate first: send a signed registration",
                                    None => "register first",
                                },
                                Some(other.type_name().into()),
                                other.seq().map(|s| s.0),
                            ),
                        }
                    }
                    Err(e) => decode_error(self.app, self.worker, &e),
                },
                Message::Binary(_) => CoordMsg::error(
                    ErrorCode::BadFrame,
                    "binary frames are not accepted before registration",
                    None,
                    None,
                ),
                Message::Close(_) => return None,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            // A frame past those allowed, and not the registration: refused, not answered.
            if read == PRE_AUTH_FRAMES {
                break;
            }
            if !self.tx.send(&mut deadline, &reply).await {
                return None;
            }
        }
        let reason = match auth {
            Some(_) => "too many frames before authentication",
            None => "too many frames before registration",
        };
        // As an overflow of the bytes before registration: the same rule, broken by count.
        self.app
            .counters
            .pre_registration_overflows
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Once a window per worker at WARN: a client that never registers may come back as
        // often as it is let in.
        let said = self.app.refusals.note(self.worker.as_str(), reason);
        if said.warn {
            tracing::warn!(worker = %self.worker, session = self.session_id, reason, repeats_at_debug = said.repeats, "connection closed (1008) before its registration (its repeats within 10 min are logged at debug; `repeats_at_debug` counts those of the last window)");
        } else {
            tracing::debug!(worker = %self.worker, session = self.session_id, reason, repeat = said.repeats, "connection closed (1008) before its registration, again");
        }
        self.close(deadline, CLOSE_POLICY, reason).await;
        None
    }

    /// Takes registration `r` (read from frame `text`): as it is without authentication, else
    /// once its check passed (a failed check is refused); either way only when it names this
    /// endpoint's worker and speaks this protocol (else it is refused here, before the core
    /// hears of the connection, so it never displaces the worker's session).
    async fn admit(
        &mut self,
        auth: Option<(&WorkerAuth, &str)>,
        mut deadline: Instant,
        r: Registration,
        text: &str,
    ) -> Option<Registered> {
        let keyed = match auth {
            None => None,
            Some((auth, nonce)) => match self.check(auth, nonce, &r, text).await {
                Ok(keyed) => keyed,
                Err(Unchecked::Secret(e @ SecretError::Unreadable { .. })) => {
                    self.cannot_check(deadline, &e).await;
                    return None;
                }
                Err(e) => {
                    self.refuse(deadline, &e).await;
                    return None;
                }
            },
        };
        if let Some(refusal) = registration_refusal(self.worker, &r) {
            // Once a window per worker and kind at WARN: a worker on another protocol, or on
            // another's endpoint, tries again without end.
            refusal.kind.count();
            let said = (self.app.refusals).note(self.worker.as_str(), refusal.kind.as_str());
            if said.warn {
                tracing::warn!(worker = %self.worker, session = self.session_id, code = refusal.code, reason = %refusal.reason, repeats_at_debug = said.repeats, "registration refused (its repeats for this reason within 10 min are logged at debug; `repeats_at_debug` counts those of the last window)");
            } else {
                tracing::debug!(worker = %self.worker, session = self.session_id, code = refusal.code, reason = %refusal.reason, repeat = said.repeats, "registration refused again");
            }
            // The key exists once the signature verified: the refusal carries its tag, as
            // every frame after the registration does.
            if let Some((_, key)) = &keyed {
                self.tx.seal = Some(Box::new(Sealer::new(key.clone(), Direction::ToWorker)));
            }
            if let Some(e) = &refusal.error
                && !self.tx.send(&mut deadline, e).await
            {
                return None;
            }
            self.close(deadline, refusal.code, &refusal.reason).await;
            return None;
        }
        if auth.is_some() {
            self.app.counters.auth_ok.fetch_add(1, Ordering::Relaxed);
        }
        Some((r, keyed))
    }

    /// Verifies the registration's signature and, when this coordinator requires per-message
    /// integrity, the tag of its frame `text` under the session key (returned with the opener
    /// that verified frame 0).
    async fn check(
        &self,
        auth: &WorkerAuth,
        nonce: &str,
        r: &Registration,
        text: &str,
    ) -> Result<Option<(Opener, SessionKey)>, Unchecked> {
        // A worker without a secret fails exactly like a wrong secret: ids are not enumerable.
        // So the signature's form is judged before the secret is looked up.
        tether_proto::auth::signature_bytes(r.signature.as_deref())?;
        let (secrets, known) = auth.secrets_or_decoy(self.worker).await?;
        let challenge = Challenge {
            worker: self.worker,
            nonce,
            timestamp: r.timestamp,
            boot_id: &r.boot_id,
        };
        let at = now();
        // During a rotation the fleet has two secrets: the one the signature proves is the
        // session's. A refusal says what the first (the fleet secret) found.
        let mut verified = None;
        for (i, candidate) in secrets.iter().enumerate() {
            let v = challenge.verify(candidate, r.signature.as_deref(), at, auth.max_skew);
            let ok = v.is_ok();
            if ok || i == 0 {
                verified = Some((v, candidate));
            }
            if ok {
                break;
            }
        }
        let Some((verified, secret)) = verified else {
            return Err(AuthError::BadSignature.into());
        };
        if !known {
            return Err(AuthError::BadSignature.into());
        }
        verified?;
        if !auth.message_mac {
            return Ok(None);
        }
        let client_nonce = r
            .client_nonce
            .as_deref()
            .filter(|n| integrity::is_nonce(n))
            .ok_or(AuthError::IntegrityRequired)?;
        let key = SessionKey::derive(secret, self.worker, nonce, client_nonce);
        let mut opener = Opener::new(key.clone(), Direction::ToCoordinator);
        match opener.open_text(text) {
            Ok(_) => Ok(Some((opener, key))),
            Err(MacError::Missing) => Err(AuthError::IntegrityRequired.into()),
            Err(MacError::Mismatch) => Err(AuthError::BadIntegrityTag.into()),
        }
    }

    async fn refuse(&mut self, mut deadline: Instant, e: &Unchecked) {
        self.app
            .counters
            .auth_failures
            .fetch_add(1, Ordering::Relaxed);
        m::Refused::Unauthorized.count();
        // Once a window per worker and reason at WARN: a fleet left on an old secret tries
        // again without end.
        let reason = e.to_string();
        let said = self.app.refusals.note(self.worker.as_str(), e.kind());
        if said.warn {
            tracing::warn!(worker = %self.worker, session = self.session_id, peer = %self.peer, %reason, repeats_at_debug = said.repeats, "worker authentication failed; closing with 4001 (its repeats for this reason within 10 min are logged at debug; `repeats_at_debug` counts those of the last window)");
        } else {
            tracing::debug!(worker = %self.worker, session = self.session_id, peer = %self.peer, %reason, repeat = said.repeats, "worker authentication failed again; closing with 4001");
        }
        let message = match e {
            // Our own file problem is logged, not told.
            Unchecked::Secret(_) => AuthError::BadSignature.to_string(),
            Unchecked::Auth(e) => e.to_string(),
        };
        let reply = CoordMsg::error(
            ErrorCode::Unauthorized,
            format!("authentication failed: {message}"),
            Some("registration".into()),
            None,
        );
        if self.tx.send(&mut deadline, &reply).await {
            self.close(deadline, CLOSE_UNAUTHORIZED, "authentication failed")
                .await;
        }
    }

    /// Answers a registration whose secret the coordinator could not read: not refused (the
    /// worker could do nothing about it, and three refusals stop it for good) but told to come
    /// back, as a coordinator that is shutting down would.
    async fn cannot_check(&mut self, mut deadline: Instant, e: &SecretError) {
        tracing::error!(worker = %self.worker, session = self.session_id, error = %e, "cannot check a worker's registration: its secret could not be read; the worker is told to try again (close 1011)");
        let reply = CoordMsg::error(
            ErrorCode::Internal,
            "the coordinator could not check the registration; try again later",
            Some("registration".into()),
            None,
        );
        if self.tx.send_rare(&mut deadline, reply).await {
            self.close(deadline, CLOSE_INTERNAL, "internal error").await;
        }
    }

    async fn close(&mut self, deadline: Instant, code: u16, reason: &str) {
        self.tx.close(deadline, code, reason).await;
    }
}

/// Why a registration's check did not pass.
#[derive(Debug, thiserror::Error)]
enum Unchecked {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

impl Unchecked {
    /// Its class, which its refusals are logged under (`ratelimit`): the text of a clock's
    /// skew or of a file's error changes from one attempt to the next.
    fn kind(&self) -> &'static str {
        match self {
            Self::Auth(e) => match e {
                AuthError::MissingSignature => "missing signature",
                AuthError::BadSignatureEncoding => "bad signature encoding",
                AuthError::BadSignature => "bad signature",
                AuthError::IntegrityRequired => "integrity required",
                AuthError::BadIntegrityTag => "bad integrity tag",
                AuthError::ClockSkew { .. } => "clock skew",
                AuthError::SecretTooShort { .. }
                | AuthError::SecretTooLong
                | AuthError::SecretFile { .. } => "secret",
            },
            Self::Secret(_) => "secret file",
        }
    }
}

/// Sends `first` and what else is queued behind it (the acks and assignments of one commit,
/// up to [`MAX_COALESCED`] messages) with one flush, so one write; in batch frames once
/// agreed. A close found in the queue is returned for the caller to send after them; `Err`
/// when a write failed or stalled.
async fn send_queued(
    out: &mut Tx,
    rx: &mut crate::core::mailbox::Receiver<Outgoing>,
    first: Outgoing,
    deadline: &mut Instant,
    agreed: &mut Outbound,
    known: &mut KnownIds,
    app: &AppState,
) -> Result<Option<(u16, String)>, ()> {
    let before = *deadline;
    let sent = write_queued(out, rx, first, deadline, agreed, known, app).await;
    count_slow_write(&app.counters, before, *deadline);
    sent
}

/// The writes of [`send_queued`].
async fn write_queued(
    out: &mut Tx,
    rx: &mut crate::core::mailbox::Receiver<Outgoing>,
    first: Outgoing,
    deadline: &mut Instant,
    agreed: &mut Outbound,
    known: &mut KnownIds,
    app: &AppState,
) -> Result<Option<(u16, String)>, ()> {
    let (mut next, mut close, mut fed) = (Some(first), None, 0);
    let counters = Some(&*app.counters);
    let mut batch = Batch::new();
    // Acknowledgements of recorded messages, sent together in one `acks` after the rest.
    let mut recorded: Vec<Seq> = Vec::new();
    while let Some(o) = next.take() {
        match o {
            // Sent only to a session that agreed to compact acknowledgements.
            Outgoing::Recorded(seq) => recorded.push(seq),
            Outgoing::Msg(m) => {
                if let CoordMsg::TaskAssignment(a) = &*m {
                    known.remember(&a.task_id);
                }
                match agreed.compact_acks.then(|| recorded_ack(&m)).flatten() {
                    Some(seq) => recorded.push(seq),
                    None => {
                        if !feed_one(out, &mut batch, &m, agreed, deadline, app).await {
                            return Err(());
                        }
                    }
                }
                // Large messages go compressed, and messages batched, from the first frame
                // after the ack.
                if let CoordMsg::RegistrationAck(a) = &*m {
                    agreed.zstd = a.compression.as_deref() == Some(ZSTD);
                    agreed.batch = a.batching;
                    agreed.compact_acks = a.compact_acks;
                }
            }
            // Its fetch leaves the session's count once the piece is fed to the socket (or to
            // the batch frame being built; the writer is sequential, so the bound holds).
            Outgoing::Piece(p) => {
                if !feed_one(out, &mut batch, &p.0, agreed, deadline, app).await {
                    return Err(());
                }
            }
            // Not reached: the caller and `more` take closes out of the queue.
            Outgoing::Close(c) => {
                close = Some(*c);
                break;
            }
        }
        fed += 1;
        next = more(rx, fed, &mut close);
    }
    if !recorded.is_empty() {
        app.counters
            .compact_acked
            .fetch_add(recorded.len() as u64, Ordering::Relaxed);
        let acks = CoordMsg::Acks(Acks::of(recorded));
        if !feed_one(out, &mut batch, &acks, agreed, deadline, app).await {
            return Err(());
        }
    }
    if !batch.is_empty()
        && !out
            .feed_text(
                deadline,
                batch.take(),
                agreed.zstd.then_some(app.cfg.compress_threshold),
                counters,
            )
            .await
    {
        return Err(());
    }
    if !out.flush(deadline).await {
        return Err(());
    }
    Ok(close)
}

/// The next queued message to coalesce into this write, while fewer than [`MAX_COALESCED`]
/// were fed; a close found in the queue goes to `close` and ends the write.
fn more(
    rx: &mut crate::core::mailbox::Receiver<Outgoing>,
    fed: usize,
    close: &mut Option<(u16, String)>,
) -> Option<Outgoing> {
    if fed >= MAX_COALESCED {
        return None;
    }
    match rx.try_recv() {
        Ok(Outgoing::Close(c)) => {
            *close = Some(*c);
            None
        }
        Ok(o) => Some(o),
        Err(_) => None,
    }
}

/// Feeds `m` (counted): into `batch` once batching is agreed (feeding the batch when it is
/// full), else as a frame of its own after whatever `batch` holds. `false` when a write failed.
async fn feed_one(
    out: &mut Tx,
    batch: &mut Batch,
    m: &CoordMsg,
    agreed: &Outbound,
    deadline: &mut Instant,
    app: &AppState,
) -> bool {
    let threshold = agreed.zstd.then_some(app.cfg.compress_threshold);
    let counters = Some(&*app.counters);
    match agreed.batch {
        // The ack itself goes alone: the worker learns from it what may follow.
        Some(limits) if !matches!(m, CoordMsg::RegistrationAck(_)) => {
            count_out(m);
            let full = batch.push_within(m, agreed.batch_bytes(&limits));
            let full = full
                .or_else(|| (batch.len() >= limits.max_messages as usize).then(|| batch.take()));
            match full {
                Some(text) => out.feed_text(deadline, text, threshold, counters).await,
                None => true,
            }
        }
        _ => {
            (batch.is_empty()
                || out
                    .feed_text(deadline, batch.take(), threshold, counters)
                    .await)
                && out.feed_framed(deadline, m, threshold, counters).await
        }
    }
}

/// The sequence number of an acknowledgement that `acks` may carry: a recorded message other
/// than a result (a result's ack names its task, which the worker logs).
fn recorded_ack(m: &CoordMsg) -> Option<Seq> {
    m.message_ack()
        .filter(|a| a.disposition == Disposition::Recorded)
        .map(|a| a.ack_seq)
}

/// Counts a message sent, and an `error` by its code.
fn count_out(m: &CoordMsg) {
    crate::metrics::MESSAGES_OUT_BY_TYPE.increment(m.type_name());
    if let CoordMsg::Error(e) = m {
        metrics::counter!(crate::metrics::ERRORS, "code" => e.code.as_str(), "direction" => "sent")
            .increment(1);
    }
}

/// A session's sending half. Once the session is keyed, every data frame carries its tag.
struct Tx {
    sink: SplitSink<WebSocket, Message>,
    seal: Option<Box<Sealer>>,
    /// The connection's counts of bytes read and written: a write that keeps taking bytes
    /// waits past its deadline (`while_draining`), and a frame still arriving shows in the
    /// count read (`frame_arriving`).
    entry: Arc<Entry>,
    /// How long a write may take no byte before it has stalled: the session's liveness
    /// timeout, as last agreed.
    stall: Duration,
}

impl Tx {
    /// Sends with a deadline, uncompressed; false when the write failed or stalled.
    async fn send(&mut self, deadline: &mut Instant, m: &CoordMsg) -> bool {
        self.send_all(deadline, std::slice::from_ref(m)).await
    }

    /// [`Tx::send`] for a rare path (a refusal, an integrity error), boxed: inline, the message
    /// and the write's state would size every idle session's future.
    fn send_rare<'a>(
        &'a mut self,
        deadline: &'a mut Instant,
        m: CoordMsg,
    ) -> Pin<Box<impl Future<Output = bool> + Send + 'a>> {
        Box::pin(async move { self.send(deadline, &m).await })
    }

    /// Sends messages, a frame each, with one flush; false when a write failed or stalled.
    async fn send_all(&mut self, deadline: &mut Instant, ms: &[CoordMsg]) -> bool {
        for m in ms {
            if !self.feed_framed(deadline, m, None, None).await {
                return false;
            }
        }
        self.flush(deadline).await
    }

    /// Feeds a message's frame, compressing it into a binary frame from `threshold` bytes; the
    /// frame may wait in the write buffer (`WS_WRITE_BUFFER`) for [`Tx::flush`].
    async fn feed_framed(
        &mut self,
        deadline: &mut Instant,
        m: &CoordMsg,
        threshold: Option<usize>,
        counters: Option<&Counters>,
    ) -> bool {
        count_out(m);
        self.feed_text(deadline, encode(m), threshold, counters)
            .await
    }

    /// Feeds a frame of `json` (one message or a batch), compressed at `threshold`.
    async fn feed_text(
        &mut self,
        deadline: &mut Instant,
        json: String,
        threshold: Option<usize>,
        counters: Option<&Counters>,
    ) -> bool {
        if let Some(c) = counters
            && is_batch(&json)
        {
            c.batch_frames_out.fetch_add(1, Ordering::Relaxed);
        }
        let frame = self.frame(json, threshold, counters);
        let feed = self.sink.feed(frame);
        let fed = while_draining(feed, deadline, self.stall, self.entry.written()).await;
        matches!(fed, Ok(Ok(())))
    }

    /// Sends a ping, its payload the ping's tag when the session is keyed (the worker takes
    /// no other ping as this coordinator's); false when the write failed or stalled.
    async fn ping(&mut self, deadline: &mut Instant) -> bool {
        let payload = self.seal.as_mut().map(|s| s.seal_ping().to_vec());
        let send = self
            .sink
            .send(Message::Ping(payload.unwrap_or_default().into()));
        let sent = while_draining(send, deadline, self.stall, self.entry.written()).await;
        matches!(sent, Ok(Ok(())))
    }

    /// Writes what the write buffer holds; false when the write failed or stalled.
    async fn flush(&mut self, deadline: &mut Instant) -> bool {
        let flush = self.sink.flush();
        let flushed = while_draining(flush, deadline, self.stall, self.entry.written()).await;
        matches!(flushed, Ok(Ok(())))
    }

    /// The frame of `json`: compressed at `threshold`, tagged when the session is keyed.
    fn frame(
        &mut self,
        json: String,
        threshold: Option<usize>,
        counters: Option<&Counters>,
    ) -> Message {
        match threshold {
            Some(threshold) if json.len() >= threshold => {
                let packed = deflate(&json);
                if let Some(c) = counters {
                    c.compressed_out_frames.fetch_add(1, Ordering::Relaxed);
                    c.compressed_out_json_bytes
                        .fetch_add(json.len() as u64, Ordering::Relaxed);
                    c.compressed_out_wire_bytes
                        .fetch_add(packed.len() as u64, Ordering::Relaxed);
                }
                match &mut self.seal {
                    Some(seal) => Message::Binary(seal.seal_binary(packed).into()),
                    None => Message::Binary(packed.into()),
                }
            }
            _ => match &mut self.seal {
                Some(seal) => Message::Text(seal.seal_text(json).into()),
                None => Message::Text(json.into()),
            },
        }
    }

    /// Sends a close frame (control frames carry no tag), giving up at the deadline. Boxed: a
    /// session closes once, and inline the write's state would size every idle session.
    fn close<'a>(
        &'a mut self,
        deadline: Instant,
        code: u16,
        reason: &str,
    ) -> Pin<Box<impl Future<Output = ()> + Send + 'a>> {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: close_reason(reason).into(),
        }));
        Box::pin(async move {
            let _ = timeout_at(deadline, self.sink.send(frame)).await;
        })
    }
}

/// The most bytes of a close frame's reason: a control frame carries 125 bytes, two of them
/// the code (RFC 6455 5.5). A longer one is refused by the peer as a protocol error, and the
/// code it carried (a refusal the worker must heed) is lost with it.
pub const MAX_CLOSE_REASON: usize = 123;

/// `reason` cut to [`MAX_CLOSE_REASON`] bytes, at a character's boundary.
fn close_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A received frame's data, its tag verified and removed when the session is keyed.
enum Data<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    Close,
    /// Ping or pong: no message, no tag.
    Control,
}

fn unseal<'a>(open: Option<&mut Opener>, frame: &'a Message) -> Result<Data<'a>, MacError> {
    Ok(match (frame, open) {
        (Message::Text(t), None) => Data::Text(t.as_str()),
        (Message::Text(t), Some(o)) => Data::Text(o.open_text(t.as_str())?),
        (Message::Binary(b), None) => Data::Binary(b),
        (Message::Binary(b), Some(o)) => Data::Binary(o.open_binary(b)?),
        (Message::Close(_), _) => Data::Close,
        (Message::Ping(_) | Message::Pong(_), _) => Data::Control,
    })
}

/// The WebSocket error behind an axum read error, if there is one.
fn ws_cause(e: &axum::Error) -> Option<&tokio_tungstenite::tungstenite::Error> {
    use std::error::Error as _;
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(err) = source {
        if let Some(ws) = err.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            return Some(ws);
        }
        source = err.source();
    }
    None
}

fn is_bad_utf8(e: &axum::Error) -> bool {
    matches!(
        ws_cause(e),
        Some(tokio_tungstenite::tungstenite::Error::Utf8(_))
    )
}

/// A read refused by the connection's budget before registration (`admission`).
fn is_over_entry_budget(e: &axum::Error) -> bool {
    matches!(
        ws_cause(e),
        Some(tokio_tungstenite::tungstenite::Error::Io(io))
            if io.get_ref().is_some_and(|inner| inner.is::<OverEntryBudget>())
    )
}

fn is_too_big(e: &axum::Error) -> bool {
    matches!(
        ws_cause(e),
        Some(tokio_tungstenite::tungstenite::Error::Capacity(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of five arguments returns, without making one.
    fn future_size<F: Future, A, B, C, D, E>(_: fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A worker's rates are kept while a session uses them or they are not full, and the
    /// sweep of a large map drops only the full ones no session uses.
    #[tokio::test(start_paused = true)]
    async fn a_workers_rates_are_forgotten_only_when_unused_and_full() {
        let limits = Limits {
            messages_per_sec: 10.0,
            message_burst: 10,
            ..Limits::default()
        };
        let paces = Paces::default();
        let w = |i: usize| WorkerId::parse(&format!("w{i}")).expect("id");
        let held = |paces: &Paces| paces.map().by_worker.len();
        // Full, no session: forgotten at its session's end.
        let p = paces.resume(&w(0), &limits);
        paces.keep(&w(0), p, &limits);
        assert_eq!(held(&paces), 0);
        // Spent, or still used by another session: kept.
        let mut a = paces.resume(&w(1), &limits);
        let b = paces.resume(&w(1), &limits);
        for _ in 0..10 {
            assert_eq!(a.admit(Instant::now(), &limits), None);
        }
        assert_eq!(
            b.shared
                .lock()
                .expect("pace")
                .admit(Instant::now(), &limits),
            Some(Over::Messages),
            "one bucket"
        );
        paces.keep(&w(1), a, &limits);
        assert_eq!(held(&paces), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        // Full again, but b still uses it.
        let open: Vec<SessionPace> = (2..PACES_SWEPT_AT + 1)
            .map(|i| paces.resume(&w(i), &limits))
            .collect();
        paces.keep(&w(2), paces.resume(&w(2), &limits), &limits);
        assert_eq!(held(&paces), PACES_SWEPT_AT, "the sweep drops none in use");
        paces.keep(&w(1), b, &limits);
        assert_eq!(held(&paces), PACES_SWEPT_AT - 1);
        drop(open);
    }

    /// Every idle connection keeps its session's future, whose size is that of its largest
    /// await: the writes and the handshake are boxed so that 10,000 idle sessions do not each
    /// carry their state (1,640 bytes before, 912 after; docs/PERFORMANCE.md, fourteenth
    /// round), and `run` keeps its arguments once (1,024 bytes before, 928 after: room for a
    /// few more fields). A new await that sizes every session fails here: the peer's address
    /// for the registration's log lines (9d33ca4) took it to 1,032, until the opening that
    /// carries it went boxed, spent by the handshake (992).
    #[test]
    fn an_idle_sessions_future_stays_small() {
        let size = future_size(run);
        assert!(size <= 1024, "the session's future takes {size} bytes");
    }

    /// A fleet that grows keeps within a twentieth of its heartbeat budget (a session beating
    /// too often is retuned once the fleet needs a 5 % longer interval), while one that shrinks
    /// a little does not retune its sessions back and forth. With the quarter both ways a fleet
    /// grew to 23 % over its budget before its sessions were retuned.
    #[test]
    fn a_growing_fleet_stays_within_its_heartbeat_budget_and_a_shrinking_one_is_retuned_later() {
        let cfg = crate::CoordinatorConfig::new("unused");
        let budget = f64::from(cfg.heartbeat_budget);
        let mut told = cfg.beat(0);
        let mut retuned = 0;
        for sessions in 1..=20_000u64 {
            let fleet = cfg.beat(sessions);
            if retunes(told, fleet) {
                told = fleet;
                retuned += 1;
            }
            let per_sec = sessions as f64 / told.interval.as_secs_f64();
            assert!(
                per_sec <= budget * 1.05 + 1.0,
                "{sessions} sessions told {:?}: {per_sec:.0} heartbeats a second",
                told.interval
            );
        }
        // From the budget's 5 s onwards each retune is a twentieth longer: 5 s to 20 s in
        // about 29 steps, not one per session.
        assert!((20..=40).contains(&retuned), "{retuned} retunes");
        // Shrinking: 20,000 to 16,100 sessions (told 20 s, needed 16.1 s) is not yet a quarter.
        let at_20k = cfg.beat(20_000);
        assert!(!retunes(at_20k, cfg.beat(16_100)));
        assert!(retunes(at_20k, cfg.beat(15_900)));
        // Growing by less than a twentieth does not retune.
        let at_10k = cfg.beat(10_000);
        assert!(!retunes(at_10k, cfg.beat(10_400)));
        assert!(retunes(at_10k, cfg.beat(10_600)));
    }

    fn same(a: &TaskId, b: &TaskId) -> bool {
        std::ptr::eq(a.as_str().as_ptr(), b.as_str().as_ptr())
    }

    #[test]
    fn a_received_id_becomes_the_remembered_copy_of_the_same_text() {
        let mut known = KnownIds::default();
        let ids: Vec<TaskId> = (0..=KnownIds::CAP).map(|_| TaskId::fresh()).collect();
        for id in &ids {
            known.remember(id);
        }
        let newest = ids.last().expect("ids");
        let mut received = TaskId::parse(newest.as_str()).expect("id");
        assert!(!same(&received, newest), "decoded: a text of its own");
        known.share(&mut received);
        assert!(same(&received, newest), "now the assignment's copy");
        // The oldest was forgotten (the cap): its id stays as received.
        let mut old = TaskId::parse(ids[0].as_str()).expect("id");
        known.share(&mut old);
        assert!(!same(&old, &ids[0]));
        assert_eq!(old, ids[0]);
        // An unknown id is left alone.
        let mut other = TaskId::fresh();
        let before = other.clone();
        known.share(&mut other);
        assert!(same(&other, &before));
    }

    #[test]
    fn a_frames_messages_go_to_the_core_in_order_in_events_of_bounded_size() {
        use tether_proto::msg::Telemetry;
        let worker = WorkerId::parse("w-1").expect("id");
        let telemetry = |n: u64| {
            WorkerMsg::Telemetry(Telemetry {
                seq: Seq(n),
                connection_stats: Default::default(),
                metrics: serde_json::Value::Null.into(),
                timestamp: now(),
            })
        };
        let n = 2 * crate::core::FRAME_EVENT_MESSAGES as u64 + 8;
        let mut frame = FrameEvents::new(&worker, 7);
        let mut events = Vec::new();
        for i in 1..=n {
            frame.push(telemetry(i));
            events.extend(frame.full());
        }
        events.extend(frame.rest());
        assert!(frame.rest().is_none(), "nothing is handed over twice");
        let mut sizes = Vec::new();
        let mut seqs = Vec::new();
        for ev in events {
            let Event::Frame {
                worker: w,
                session_id,
                msgs,
            } = ev
            else {
                panic!("a frame event");
            };
            assert_eq!((w.as_str(), session_id), ("w-1", 7));
            sizes.push(msgs.len());
            seqs.extend(msgs.iter().filter_map(|m| match m {
                WorkerMsg::Telemetry(t) => Some(t.seq.0),
                _ => None,
            }));
        }
        assert_eq!(sizes, vec![16, 16, 8]);
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
    }

    /// Workers whose session panics at its next frame (a test's own id: tests run together).
    static PANIC_ON_FRAME: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

    /// Panics when `worker`'s session was asked to (see [`PANIC_ON_FRAME`]).
    pub(super) fn panic_if_asked(worker: &WorkerId) {
        let asked = PANIC_ON_FRAME
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|w| w == worker.as_str());
        assert!(!asked, "panic asked for the session of {worker}");
    }

    /// The worker endpoint as the coordinator serves it (the admission listener, the upgrade
    /// handler, real sessions) on 127.0.0.1:0, with no core: the test is the core, reading
    /// the events from a queue of `queue`.
    struct FakeCore {
        addr: std::net::SocketAddr,
        events: tokio::sync::mpsc::Receiver<Event>,
        stop: tokio_util::sync::CancellationToken,
        store_stats: Arc<crate::store::StoreStats>,
        counters: Arc<Counters>,
    }

    /// A [`FakeCore`] (its queue `queue` long) behind a coordinator with this heartbeat
    /// interval and timeout (ms), its other settings the defaults.
    async fn beating(interval_ms: u64, timeout_ms: u64, queue: usize) -> FakeCore {
        let mut cfg = crate::CoordinatorConfig::new("/unused");
        cfg.heartbeat_interval = Duration::from_millis(interval_ms);
        cfg.heartbeat_timeout = Duration::from_millis(timeout_ms);
        FakeCore::start(cfg, queue).await
    }

    impl FakeCore {
        async fn start(cfg: crate::CoordinatorConfig, queue: usize) -> Self {
            let (tx, events) = tokio::sync::mpsc::channel(queue);
            let stop = tokio_util::sync::CancellationToken::new();
            let counters = Arc::new(Counters::default());
            let store_stats = Arc::new(crate::store::StoreStats::default());
            let state = Arc::new(AppState {
                events: tx,
                counters: counters.clone(),
                store_stats: store_stats.clone(),
                changes: tokio::sync::broadcast::channel(16).0,
                history: Arc::new(crate::dashboard::History::new(cfg.history_interval)),
                stop: stop.clone(),
                heavy: Arc::new(tokio::sync::Semaphore::new(1)),
                controls: Arc::new(tokio::sync::Semaphore::new(1)),
                submits: Arc::new(tokio::sync::Semaphore::new(1)),
                paces: Paces::default(),
                refusals: Default::default(),
                cfg: Arc::new(cfg),
            });
            let limits = state.cfg.limits.clone();
            let router = axum::Router::new()
                .route("/api/v1/worker/{*rest}", axum::routing::get(upgrade))
                .with_state(state.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let listener = crate::admission::Admission::new(listener, limits, counters);
            let serving = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<Peer>(),
            )
            .with_graceful_shutdown(stop.clone().cancelled_owned());
            tokio::spawn(async move {
                let _ = serving.await;
            });
            Self {
                addr,
                events,
                stop,
                store_stats,
                counters: state.counters.clone(),
            }
        }

        /// The next event, within 5 s.
        async fn next(&mut self) -> Event {
            tokio::time::timeout(Duration::from_secs(5), self.events.recv())
                .await
                .expect("an event in time")
                .expect("the queue open")
        }
    }

    impl Drop for FakeCore {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    type Client = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    /// A worker `id` connected and registered; the core has taken its `Connected`, holds its
    /// session (a session whose core dropped it ends), and has acknowledged the registration
    /// (read by the worker).
    async fn registered(core: &mut FakeCore, id: &str) -> (Client, SessionRef) {
        let (mut ws, session) = unacknowledged(core, id).await;
        acknowledge(&mut ws, &session, id).await;
        (ws, session)
    }

    /// The core acknowledges worker `id`'s registration on `session`; the worker reads it.
    async fn acknowledge(ws: &mut Client, session: &SessionRef, id: &str) {
        let ack = CoordMsg::RegistrationAck(tether_proto::msg::RegistrationAck {
            worker_id: WorkerId::parse(id).expect("an id"),
            session_id: session.id,
            directives: Vec::new(),
            compression: None,
            batching: None,
            compact_acks: false,
            max_frame: None,
            max_checkpoint: None,
            message_rate: None,
            byte_rate: None,
            lost_after_ms: None,
            timestamp: now(),
        });
        session
            .tx
            .send_all([Outgoing::Msg(Box::new(ack))])
            .expect("open");
        let ack = next_json(ws).await.expect("the registration_ack");
        assert_eq!(ack["type"], "registration_ack", "{ack}");
    }

    /// The worker on `ws` beats, and the session answers (it was not closed).
    async fn beat_answered(ws: &mut Client) {
        send_json(
            ws,
            serde_json::json!({"type": "heartbeat", "sequence": 1, "timestamp": now()}),
        )
        .await;
        let reply = next_json(ws).await;
        assert_eq!(
            reply.as_ref().map(|r| r["type"].clone()),
            Some("heartbeat".into()),
            "the session was closed: {reply:?}"
        );
    }

    /// [`registered`], but the core has not answered the registration yet.
    async fn unacknowledged(core: &mut FakeCore, id: &str) -> (Client, SessionRef) {
        unacknowledged_stating(core, id, None).await
    }

    /// [`unacknowledged`], the registration stating the worker's liveness timeout `stated` (ms).
    async fn unacknowledged_stating(
        core: &mut FakeCore,
        id: &str,
        stated: Option<u64>,
    ) -> (Client, SessionRef) {
        let ws = registering_stating(core, id, stated).await;
        let Event::Connected {
            worker, session, ..
        } = core.next().await
        else {
            panic!("a connection first");
        };
        assert_eq!(worker.as_str(), id);
        (ws, session)
    }

    /// A worker `id` connected, welcomed, and its registration sent.
    async fn registering(core: &FakeCore, id: &str) -> Client {
        registering_stating(core, id, None).await
    }

    /// [`registering`], the registration stating the worker's liveness timeout `stated` (ms;
    /// none: the field left out, as an older worker does).
    async fn registering_stating(core: &FakeCore, id: &str, stated: Option<u64>) -> Client {
        let url = format!("ws://{}/api/v1/worker/{id}/ws", core.addr);
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect");
        let welcome = next_json(&mut ws).await.expect("a welcome");
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        let mut registration = serde_json::json!({"type": "registration", "worker_id": id,
            "protocol_version": PROTOCOL_VERSION, "boot_id": "b", "capabilities": [],
            "slots": 1, "executors": ["sleep"], "timestamp": now()});
        if let Some(ms) = stated {
            registration["heartbeat_timeout_ms"] = ms.into();
        }
        send_json(&mut ws, registration).await;
        ws
    }

    /// The frames `ws` gets for `d`: pings counted, anything else a failure (a close among it).
    async fn pings_for(ws: &mut Client, d: Duration) -> usize {
        use tokio_tungstenite::tungstenite::Message as M;
        let mut pings = 0;
        let over = tokio::time::sleep(d);
        tokio::pin!(over);
        loop {
            tokio::select! {
                () = &mut over => return pings,
                m = ws.next() => match m {
                    Some(Ok(M::Ping(_))) => pings += 1,
                    other => panic!("pings only, not {other:?}"),
                },
            }
        }
    }

    async fn send_json(ws: &mut Client, v: serde_json::Value) {
        use tokio_tungstenite::tungstenite::Message as M;
        ws.send(M::text(v.to_string())).await.expect("send");
    }

    /// The next message, or `None` once the session is closed (within 5 s).
    async fn next_json(ws: &mut Client) -> Option<serde_json::Value> {
        use tokio_tungstenite::tungstenite::Message as M;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("a frame in time");
            match m {
                Some(Ok(M::Text(t))) => return Some(serde_json::from_str(&t).expect("json")),
                Some(Ok(M::Close(_))) | Some(Err(_)) | None => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    fn describe(ev: &Event) -> String {
        match ev {
            Event::Connected { worker, .. } => format!("connected {worker}"),
            Event::Frame { worker, msgs, .. } => format!("frame {worker} {msgs:?}"),
            Event::Disconnected { worker, .. } => format!("disconnected {worker}"),
            Event::Api(_) => "api".into(),
        }
    }

    fn task_state(seq: u64) -> serde_json::Value {
        serde_json::json!({"type": "task_state", "seq": seq, "task_id": "t-1", "attempt": 1,
            "state": {}, "timestamp": now()})
    }

    /// A registration again in a registered session (without authentication: with it, the
    /// session refuses it itself) changes none of the session's terms: the core refuses it and
    /// reconciles nothing, and a session that took its offer of compression would have taken
    /// compressed frames the worker had not agreed when it registered.
    #[tokio::test]
    async fn a_registration_again_changes_none_of_the_sessions_terms() {
        use tokio_tungstenite::tungstenite::Message as M;
        let mut core = FakeCore::start(crate::CoordinatorConfig::new("/nonexistent"), 16).await;
        let (mut ws, _session) = registered(&mut core, "w").await;
        send_json(
            &mut ws,
            serde_json::json!({"type": "registration", "worker_id": "w",
                "protocol_version": PROTOCOL_VERSION, "boot_id": "b", "capabilities": [],
                "slots": 1, "executors": ["sleep"], "compression": ["zstd"],
                "timestamp": now()}),
        )
        .await;
        let ev = core.next().await;
        assert!(
            matches!(&ev, Event::Frame { msgs, .. } if matches!(msgs.as_slice(), [WorkerMsg::Registration(_)])),
            "passed to the core to refuse: {}",
            describe(&ev)
        );
        let beat = serde_json::json!({"type": "heartbeat", "sequence": 7, "timestamp": now()});
        ws.send(M::binary(tether_proto::compress::deflate(
            &beat.to_string(),
        )))
        .await
        .expect("send");
        let reply = next_json(&mut ws).await.expect("an answer");
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "bad_frame", "{reply}");
    }

    /// A session waiting for room in the core's queue, for longer than its heartbeat timeout,
    /// is not closed as silent when the room comes: the wait was the coordinator's, and the
    /// worker has its whole timeout from then on to send its next frame.
    #[tokio::test]
    async fn a_session_waiting_on_a_full_core_queue_is_not_timed_out_for_it() {
        let mut core = beating(100, 400, 1).await;
        let (mut ws, _session) = registered(&mut core, "w-slow-core").await;
        // The first frame's event fills the queue; the second's waits for room.
        send_json(&mut ws, task_state(1)).await;
        send_json(&mut ws, task_state(2)).await;
        // The core stalls for several timeouts, then takes both. Meanwhile the session pings
        // the worker, which would otherwise take its silent coordinator for dead.
        let mut pings = 0;
        let stall = tokio::time::sleep(Duration::from_millis(1500));
        tokio::pin!(stall);
        loop {
            use tokio_tungstenite::tungstenite::Message as M;
            tokio::select! {
                () = &mut stall => break,
                m = ws.next() => match m {
                    Some(Ok(M::Ping(_))) => pings += 1,
                    other => panic!("a ping while the core stalls, not {other:?}"),
                },
            }
        }
        assert!(pings >= 5, "{pings} pings in 1.5 s, every 100 ms due");
        for seq in [1, 2] {
            let ev = core.next().await;
            let Event::Frame { msgs, .. } = ev else {
                panic!("frame {seq}, not {}", describe(&ev));
            };
            assert_eq!(msgs[0].seq().map(|s| s.0), Some(seq));
        }
        // Within its timeout of the room coming, the worker beats, and is answered.
        tokio::time::sleep(Duration::from_millis(200)).await;
        beat_answered(&mut ws).await;
    }

    /// A registered worker waits, saying nothing, for its `registration_ack`, which is sent once
    /// the registration's reconciliation has committed. Its silence meanwhile is not counted:
    /// the session outlives its heartbeat timeout. While the store is held on a commit (out of
    /// space) the worker is pinged every heartbeat interval, or it took its coordinator for
    /// dead and registered again, and again, for as long as the commit was held. Once the ack
    /// is out the pings stop and the worker has its whole timeout from then.
    #[tokio::test]
    async fn a_worker_waiting_for_its_registration_ack_behind_a_held_commit_is_pinged_and_kept() {
        let mut core = beating(100, 400, 16).await;
        let (mut ws, session) = unacknowledged(&mut core, "w-awaiting").await;
        // The commit is not held: no ping, and no close past the timeout either.
        assert_eq!(pings_for(&mut ws, Duration::from_millis(1000)).await, 0);
        // Held: pings.
        core.store_stats.group_begins();
        let pings = pings_for(&mut ws, Duration::from_millis(1500)).await;
        assert!(pings >= 5, "{pings} pings in 1.5 s, every 100 ms due");
        assert_eq!(
            core.counters.keepalive_pings.load(Ordering::Relaxed) as usize,
            pings
        );
        // The commit goes through: the ack, then no more pings though the store is held
        // again, and the worker's heartbeat within its timeout of the ack is answered.
        core.store_stats.group_ends();
        acknowledge(&mut ws, &session, "w-awaiting").await;
        core.store_stats.group_begins();
        assert_eq!(pings_for(&mut ws, Duration::from_millis(300)).await, 0);
        beat_answered(&mut ws).await;
    }

    /// A worker that vanished while it waited for its `registration_ack` behind a held commit
    /// (a pulled cable: no TCP close, no answer to the pings) is dropped once it answered no
    /// ping for its heartbeat timeout, as a registered worker silent for its timeout is: the
    /// core hears of the session's end, and the ack, once the commit goes through, finds no
    /// session to write to. It was kept for as long as the commit was held.
    #[tokio::test]
    async fn a_worker_that_answers_no_ping_while_its_registration_ack_is_held_is_dropped() {
        use tokio_tungstenite::tungstenite::Message as M;
        let mut core = beating(100, 400, 16).await;
        let (mut ws, session) = unacknowledged(&mut core, "w-gone").await;
        // Held, and the worker reads nothing from here on: no pong answers the pings.
        core.store_stats.group_begins();
        let ev = core.next().await;
        assert!(
            matches!(&ev, Event::Disconnected { worker, session_id }
                if worker.as_str() == "w-gone" && *session_id == session.id),
            "{}",
            describe(&ev)
        );
        assert!(
            core.counters.keepalive_pings.load(Ordering::Relaxed) >= 1,
            "pinged first"
        );
        // The commit goes through: its ack has no session to go to.
        core.store_stats.group_ends();
        let mut closed = false;
        for _ in 0..500 {
            let ack = CoordMsg::error(ErrorCode::BadFrame, "stands for the ack", None, None);
            if session.tx.send_all([Outgoing::Msg(Box::new(ack))]).is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed, "the session's queue is still open");
        // What the worker was sent: pings, then the connection's end; no message.
        let mut pings = 0;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("a frame, or the end, in time");
            match m {
                Some(Ok(M::Ping(_))) => pings += 1,
                Some(Ok(M::Close(_))) | Some(Err(_)) | None => break,
                other => panic!("pings only, not {other:?}"),
            }
        }
        assert!(pings >= 1, "{pings} pings");
    }

    /// With integrity tags on, pings and pongs keep no registered session alive (they carry
    /// no tag); but a worker waiting for its `registration_ack` sends nothing else, so while
    /// the ack is held its pongs are its answers, and it is kept.
    #[tokio::test]
    async fn a_keyed_worker_answering_the_pings_while_its_registration_ack_is_held_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).expect("mkdir");
        std::fs::write(secrets.join("w-keyed"), "the worker's own secret\n").expect("write");
        let secret = tether_proto::auth::Secret::new(b"the worker's own secret").expect("secret");
        let mut cfg = crate::CoordinatorConfig::new("/unused");
        cfg.heartbeat_interval = Duration::from_millis(100);
        cfg.heartbeat_timeout = Duration::from_millis(400);
        cfg.auth = Some(WorkerAuth {
            fleet: None,
            dir: Some(secrets),
            max_skew: tether_proto::auth::DEFAULT_MAX_SKEW,
            message_mac: true,
        });
        let mut core = FakeCore::start(cfg, 16).await;
        // The registration, signed, and its frame tagged under the session key.
        let url = format!("ws://{}/api/v1/worker/w-keyed/ws", core.addr);
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect");
        let welcome = next_json(&mut ws).await.expect("a welcome");
        let nonce = welcome["nonce"].as_str().expect("a nonce").to_owned();
        let id = WorkerId::parse("w-keyed").expect("id");
        let client_nonce = to_hex(&[7u8; NONCE_BYTES]);
        let at = now();
        let signature = Challenge {
            worker: &id,
            nonce: &nonce,
            timestamp: at,
            boot_id: "b",
        }
        .sign(&secret);
        let registration = serde_json::json!({"type": "registration", "worker_id": "w-keyed",
            "protocol_version": PROTOCOL_VERSION, "boot_id": "b", "capabilities": [],
            "slots": 1, "executors": ["sleep"], "timestamp": at, "signature": signature,
            "client_nonce": client_nonce});
        let key = SessionKey::derive(&secret, &id, &nonce, &client_nonce);
        let sealed = Sealer::new(key, Direction::ToCoordinator).seal_text(registration.to_string());
        ws.send(tokio_tungstenite::tungstenite::Message::text(sealed))
            .await
            .expect("send");
        // Held: a session whose core dropped it ends.
        let Event::Connected {
            worker,
            session: _session,
            ..
        } = core.next().await
        else {
            panic!("a connection");
        };
        assert_eq!(worker.as_str(), "w-keyed");
        core.store_stats.group_begins();
        // Read, the pings are answered (tungstenite pongs each as it reads on).
        let pings = pings_for(&mut ws, Duration::from_millis(1500)).await;
        assert!(pings >= 5, "{pings} pings in 1.5 s, every 100 ms due");
        assert_eq!(core.counters.mac_sessions.load(Ordering::Relaxed), 1);
    }

    /// A registration that waits for room in the core's queue (the core held up behind its
    /// store) has its worker pinged meanwhile, which waits for its acknowledgement; the core
    /// gets it once there is room.
    #[tokio::test]
    async fn a_registration_waiting_on_a_full_core_queue_has_its_worker_pinged() {
        let mut core = beating(100, 400, 1).await;
        let (mut first, _session) = registered(&mut core, "w-first").await;
        // The first worker's frame fills the core's queue.
        send_json(&mut first, task_state(1)).await;
        let mut ws = registering(&core, "w-second").await;
        let pings = pings_for(&mut ws, Duration::from_millis(1500)).await;
        assert!(pings >= 5, "{pings} pings in 1.5 s, every 100 ms due");
        let ev = core.next().await;
        assert!(matches!(ev, Event::Frame { .. }), "{}", describe(&ev));
        let ev = core.next().await;
        assert!(
            matches!(&ev, Event::Connected { worker, .. } if worker.as_str() == "w-second"),
            "{}",
            describe(&ev)
        );
    }

    /// A worker that states its liveness timeout in its registration is pinged, while its
    /// `registration_ack` waits behind a held commit, at a third of that timeout (bounded by
    /// the heartbeat interval), not every 250 ms: here 1 s, where a worker that states none is
    /// still pinged every 250 ms. Before, 10,000 workers registering while the disk was full
    /// took 40,000 pings a second, all for as long as it stayed full.
    #[tokio::test]
    async fn a_worker_stating_its_timeout_is_pinged_at_a_third_of_it_and_one_stating_none_every_250_ms()
     {
        let mut core = beating(1000, 3000, 16).await;
        let (mut stating, _a) = unacknowledged_stating(&mut core, "w-states", Some(3000)).await;
        let (mut older, _b) = unacknowledged(&mut core, "w-older").await;
        core.store_stats.group_begins();
        let held = Duration::from_millis(4000);
        let (pinged, older_pinged) =
            tokio::join!(pings_for(&mut stating, held), pings_for(&mut older, held));
        // Held a second before the first, then a second apart: 3 at most; every 250 ms, 12.
        assert!(pinged <= 4, "{pinged} pings in 4 s, every 1 s due");
        assert!(
            older_pinged >= 5,
            "{older_pinged} pings in 4 s, every 250 ms due after 1 s"
        );
        assert_eq!(
            core.counters.keepalive_pings.load(Ordering::Relaxed) as usize,
            pinged + older_pinged
        );
    }

    /// A worker whose liveness timeout (1.5 s, as its registration states) is shorter than the
    /// coordinator's heartbeat interval (2 s) is kept through a commit held for more than twice
    /// its timeout: the client here declares the link dead as the Rust worker does, once its
    /// timeout passes without a frame. Its first ping comes once the commit was held a
    /// keepalive period (a third of its timeout), not a heartbeat interval, by which time it had
    /// given up on its coordinator and registered again, and again, while the disk stayed full.
    #[tokio::test]
    async fn a_worker_stating_a_timeout_shorter_than_the_heartbeat_interval_is_kept_through_a_held_commit()
     {
        use tokio_tungstenite::tungstenite::Message as M;
        let mut core = beating(2000, 6000, 16).await;
        let timeout = Duration::from_millis(1500);
        let (mut ws, session) =
            unacknowledged_stating(&mut core, "w-short", Some(timeout.as_millis() as u64)).await;
        core.store_stats.group_begins();
        // The worker's last frame was the welcome, read before it registered.
        let mut last_frame = tokio::time::Instant::now();
        let until = last_frame + timeout * 2 + Duration::from_millis(200);
        let mut pings = 0;
        while tokio::time::Instant::now() < until {
            let dead = last_frame + timeout;
            match tokio::time::timeout_at(dead.min(until), ws.next()).await {
                Ok(Some(Ok(M::Ping(_)))) => {
                    pings += 1;
                    last_frame = tokio::time::Instant::now();
                }
                Ok(other) => panic!("pings only, not {other:?}"),
                Err(_) => assert!(
                    until <= dead,
                    "no frame for its timeout of {timeout:?}: the worker gave up ({pings} pings)"
                ),
            }
        }
        assert!(pings >= 2, "{pings} pings");
        // The commit goes through: the ack, and the session goes on.
        core.store_stats.group_ends();
        acknowledge(&mut ws, &session, "w-short").await;
        beat_answered(&mut ws).await;
    }

    /// A registration that states a liveness timeout under 10 ms (0 among them) is refused
    /// saying so, `bad_frame` and close 4002, before the core hears of it: taken, a timeout of
    /// 0 had its session ping without end.
    #[tokio::test]
    async fn a_registration_stating_a_timeout_under_the_least_is_refused_saying_so() {
        let core = FakeCore::start(crate::CoordinatorConfig::new("/unused"), 16).await;
        for ms in [0, 9] {
            let mut ws = registering_stating(&core, "w-zero", Some(ms)).await;
            let (error, code) = answer(&mut ws).await;
            let error = error.expect("an error");
            assert_eq!(error["code"], "bad_frame", "{error}");
            let said = format!("a heartbeat_timeout_ms of {ms}; at least 10");
            assert!(
                error["message"].as_str().is_some_and(|m| m.contains(&said)),
                "{error}"
            );
            assert_eq!(code, Some(4002), "{error}");
        }
    }

    /// A registration that waits for room in the core's queue has its worker pinged at a
    /// third of the timeout it stated (bounded by the heartbeat interval), not every 250 ms.
    #[tokio::test]
    async fn a_registration_waiting_on_a_full_core_queue_is_pinged_at_a_third_of_its_stated_timeout()
     {
        let mut core = beating(1000, 3000, 1).await;
        let (mut first, _session) = registered(&mut core, "w-first").await;
        // The first worker's frame fills the core's queue.
        send_json(&mut first, task_state(1)).await;
        let mut ws = registering_stating(&core, "w-second", Some(3000)).await;
        let pings = pings_for(&mut ws, Duration::from_millis(3000)).await;
        // A second apart: 3; every 250 ms, 12.
        assert!(pings <= 4, "{pings} pings in 3 s, every 1 s due");
        assert!(pings >= 1, "pinged at all");
        let ev = core.next().await;
        assert!(matches!(ev, Event::Frame { .. }), "{}", describe(&ev));
        let ev = core.next().await;
        assert!(
            matches!(&ev, Event::Connected { worker, .. } if worker.as_str() == "w-second"),
            "{}",
            describe(&ev)
        );
    }

    /// A session whose outgoing queue is over its bound writes before it reads another frame:
    /// a worker that sends faster than it reads its replies backs up in its own socket, not in
    /// the session's queue. Here the session waits on a full core queue while its own queue
    /// fills past the bound and the worker sends a heartbeat (answered by the session itself,
    /// so its reply shows where in the queue the session read it): the reply comes only after
    /// the replies over the bound. Reading at once, it came within the first few writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_over_its_queue_bound_writes_before_it_reads_another_frame() {
        let mut core = FakeCore::start(crate::CoordinatorConfig::new("/unused"), 1).await;
        let (mut ws, session) = registered(&mut core, "w-backlog").await;
        // The first frame's event fills the core's queue; the second's waits for room, and the
        // session reads and writes nothing meanwhile (pings aside).
        send_json(&mut ws, task_state(1)).await;
        send_json(&mut ws, task_state(2)).await;
        let n = MAX_BACKLOG + 2 * MAX_BATCH_MESSAGES as usize;
        let replies = (0..n).map(|i| {
            let e = CoordMsg::error(ErrorCode::BadFrame, format!("queued {i}"), None, None);
            Outgoing::Msg(Box::new(e))
        });
        session.tx.send_all(replies).expect("open");
        send_json(
            &mut ws,
            serde_json::json!({"type": "heartbeat", "sequence": 1, "timestamp": now()}),
        )
        .await;
        // Idle a moment, so the runtime's reactor has seen the heartbeat arrive (on this
        // single-threaded runtime it looks only when no task is ready) and the session finds
        // its frame ready beside its queue, as a session under a flood does.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for seq in [1, 2] {
            let ev = core.next().await;
            let Event::Frame { msgs, .. } = ev else {
                panic!("frame {seq}, not {}", describe(&ev));
            };
            assert_eq!(msgs[0].seq().map(|s| s.0), Some(seq));
        }
        let mut errors = 0;
        let at = loop {
            let v = next_json(&mut ws).await.expect("open");
            match v["type"].as_str() {
                Some("error") => errors += 1,
                Some("heartbeat") => break errors,
                _ => panic!("a queued reply or the heartbeat's, not {v}"),
            }
        };
        assert!(
            at >= n - MAX_BACKLOG,
            "the heartbeat was read with {} replies queued, over the bound of {MAX_BACKLOG}",
            n - at
        );
        while errors < n {
            let v = next_json(&mut ws).await.expect("open");
            assert_eq!(v["type"], "error", "{v}");
            errors += 1;
        }
    }

    /// The frames that follow heartbeat `beat` sent on `ws`, until a marker frame sent after it
    /// is answered (an unknown type, refused with an `error` by the session itself): "reply"
    /// for the heartbeat's reply, "ping", "other".
    async fn after_beat(ws: &mut Client, beat: serde_json::Value) -> Vec<&'static str> {
        use tokio_tungstenite::tungstenite::Message as M;
        send_json(ws, beat).await;
        send_json(ws, serde_json::json!({"type": "no_such_type"})).await;
        let mut seen = Vec::new();
        // Bounded: the marker's answer comes within a few frames, each within 5 s.
        for _ in 0..100 {
            let m = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
            match m.expect("a frame in time") {
                Some(Ok(M::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).expect("json");
                    if v["type"] == "error" {
                        return seen;
                    }
                    seen.push(if v["type"] == "heartbeat" {
                        "reply"
                    } else {
                        "other"
                    });
                }
                Some(Ok(M::Ping(_))) => seen.push("ping"),
                other => panic!("{other:?}"),
            }
        }
        panic!("the marker was never answered: {seen:?}");
    }

    /// While the store is held on a commit for a heartbeat interval or more, a heartbeat's
    /// reply comes with a ping: what the worker sent before waits for its acknowledgement
    /// behind that commit, and without a sign that the coordinator has it the worker would
    /// take the silence for a link that lost its frames. Otherwise the reply comes alone.
    #[tokio::test]
    async fn a_heartbeat_answered_while_the_store_is_held_comes_with_a_ping() {
        let mut core = beating(100, 1000, 16).await;
        let (mut ws, _session) = registered(&mut core, "w-held").await;
        let beat =
            |n: u64| serde_json::json!({"type": "heartbeat", "sequence": n, "timestamp": now()});
        assert_eq!(after_beat(&mut ws, beat(1)).await, ["reply"], "not held");
        core.store_stats.group_begins();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            after_beat(&mut ws, beat(2)).await,
            ["reply", "ping"],
            "held"
        );
        core.store_stats.group_ends();
        assert_eq!(
            after_beat(&mut ws, beat(3)).await,
            ["reply"],
            "no longer held"
        );
    }

    /// A worker that stated its liveness timeout (1.5 s, under the coordinator's 10 s heartbeat
    /// interval) takes a message of its unacknowledged for that long as lost: its heartbeat
    /// answered once the store has held a commit for a keepalive period of its session (a
    /// third of its timeout) comes with a ping. Pinged only past a heartbeat interval of hold,
    /// it had given up on the link long before. A worker that stated none gets the ping past a
    /// heartbeat interval, as before: its timeout is not known.
    #[tokio::test]
    async fn a_heartbeat_of_a_worker_stating_its_timeout_comes_with_a_ping_once_held_a_keepalive_period()
     {
        let mut core = beating(10000, 30000, 16).await;
        let (mut stating, stating_session) =
            unacknowledged_stating(&mut core, "w-states", Some(1500)).await;
        acknowledge(&mut stating, &stating_session, "w-states").await;
        let (mut older, _older_session) = registered(&mut core, "w-older").await;
        core.store_stats.group_begins();
        // Held for two of the stating worker's keepalive periods (500 ms), a tenth of the
        // heartbeat interval.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let beat = serde_json::json!({"type": "heartbeat", "sequence": 1, "timestamp": now()});
        assert_eq!(
            after_beat(&mut stating, beat.clone()).await,
            ["reply", "ping"],
            "stating 1.5 s, held 1 s"
        );
        assert_eq!(
            after_beat(&mut older, beat).await,
            ["reply"],
            "stating none, held under the interval"
        );
        core.store_stats.group_ends();
    }

    /// A frame still arriving (its bytes coming, no frame completed) has its worker pinged
    /// every keepalive period of the session: for a worker that stated its timeout (300 ms),
    /// a third of it, however long the coordinator's heartbeat interval (10 s here). Its
    /// heartbeats wait behind that frame: pinged every interval, it took the coordinator for
    /// dead before the first ping.
    #[tokio::test]
    async fn a_frame_arriving_slowly_has_a_worker_stating_its_timeout_pinged_every_keepalive_period()
     {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut core = beating(10000, 30000, 16).await;
        let (mut ws, session) = unacknowledged_stating(&mut core, "w-slow", Some(300)).await;
        acknowledge(&mut ws, &session, "w-slow").await;
        // From here the test speaks WebSocket on the socket itself (nothing more is sent to
        // the worker unasked): a client library would write its pong to a ping in the middle
        // of the frame being written.
        let (mut rd, mut wr) = tokio::io::split(ws.get_mut());
        let text = serde_json::json!({"type": "heartbeat", "sequence": 1, "timestamp": now(),
            "pad": "x".repeat(16 * 1024)})
        .to_string();
        // A client's text frame, masked with a key of zeros: the payload as it is.
        let mut frame = vec![0x81, 0x80 | 126];
        frame.extend_from_slice(&u16::try_from(text.len()).expect("short").to_be_bytes());
        frame.extend_from_slice(&[0; 4]);
        frame.extend_from_slice(text.as_bytes());
        // In 32 pieces 50 ms apart: 1.6 s, 16 keepalive periods and a sixth of an interval.
        let write = async {
            for piece in frame.chunks(frame.len().div_ceil(32)) {
                wr.write_all(piece).await.expect("write");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        // The coordinator's frames (unmasked): pings counted until the heartbeat's reply.
        let read = async {
            let mut pings = 0;
            for _ in 0..1000 {
                let mut head = [0u8; 2];
                rd.read_exact(&mut head).await.expect("a frame");
                let len = match head[1] & 0x7f {
                    126 => {
                        let mut n = [0u8; 2];
                        rd.read_exact(&mut n).await.expect("its length");
                        usize::from(u16::from_be_bytes(n))
                    }
                    127 => panic!("a frame too long for this test"),
                    n => usize::from(n),
                };
                let mut payload = vec![0; len];
                rd.read_exact(&mut payload).await.expect("its payload");
                match head[0] & 0x0f {
                    0x9 => pings += 1,
                    0x1 => {
                        let v: serde_json::Value = serde_json::from_slice(&payload).expect("json");
                        return (pings, v);
                    }
                    op => panic!("a ping or the reply, not opcode {op}"),
                }
            }
            panic!("no reply in 1000 frames");
        };
        let ((), (pings, reply)) =
            tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(write, read) })
                .await
                .expect("the frame sent and answered in time");
        assert_eq!(reply["type"], "heartbeat", "{reply}");
        assert!(
            pings >= 3,
            "{pings} pings while the frame arrived for 1.6 s, every 100 ms due"
        );
        assert_eq!(
            core.counters.keepalive_pings.load(Ordering::Relaxed) as usize,
            pings
        );
    }

    /// A session whose task panics still tells the core it ended, with the queue free and
    /// with it full (the event then waits for room): its worker does not stay connected.
    #[tokio::test]
    async fn a_panicking_session_still_tells_the_core_it_ended() {
        let cfg = crate::CoordinatorConfig::new("/unused");
        let mut core = FakeCore::start(cfg, 1).await;
        let beat = serde_json::json!({"type": "heartbeat", "sequence": 1, "timestamp": now()});
        for (id, full) in [("w-panics", false), ("w-panics-full", true)] {
            let (mut ws, session) = registered(&mut core, id).await;
            if full {
                send_json(&mut ws, task_state(1)).await;
                // Answered after its event is queued: the queue is full from here on.
                send_json(&mut ws, beat.clone()).await;
                assert!(next_json(&mut ws).await.is_some());
            }
            PANIC_ON_FRAME
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(id.to_owned());
            send_json(&mut ws, beat.clone()).await;
            assert_eq!(next_json(&mut ws).await, None, "the connection ends");
            if full {
                assert!(matches!(core.next().await, Event::Frame { .. }));
            }
            let Event::Disconnected { worker, session_id } = core.next().await else {
                panic!("a disconnect");
            };
            assert_eq!((worker.as_str(), session_id), (id, session.id));
        }
    }

    /// A connection of worker `id` that sent its registration, signed with `secret`.
    async fn signed_registration(
        core: &FakeCore,
        id: &str,
        secret: &tether_proto::auth::Secret,
    ) -> Client {
        let url = format!("ws://{}/api/v1/worker/{id}/ws", core.addr);
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect");
        let welcome = next_json(&mut ws).await.expect("a welcome");
        let nonce = welcome["nonce"].as_str().expect("a nonce").to_owned();
        let worker = WorkerId::parse(id).expect("id");
        let at = now();
        let signature = Challenge {
            worker: &worker,
            nonce: &nonce,
            timestamp: at,
            boot_id: "b",
        }
        .sign(secret);
        send_json(
            &mut ws,
            serde_json::json!({"type": "registration", "worker_id": id,
                "protocol_version": PROTOCOL_VERSION, "boot_id": "b", "capabilities": [],
                "slots": 1, "executors": ["sleep"], "timestamp": at, "signature": signature}),
        )
        .await;
        ws
    }

    /// What a connection is told before it is closed: the last message, and the close code.
    async fn answer(ws: &mut Client) -> (Option<serde_json::Value>, Option<u16>) {
        use tokio_tungstenite::tungstenite::Message as M;
        let mut error = None;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("a frame in time");
            match m {
                Some(Ok(M::Text(t))) => error = Some(serde_json::from_str(&t).expect("json")),
                Some(Ok(M::Close(c))) => return (error, c.map(|c| u16::from(c.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return (error, None),
            }
        }
    }

    /// A secret the coordinator cannot read (here the secrets "directory" is a file, so the
    /// read fails with ENOTDIR; in life too many open files in a reconnect storm, an I/O
    /// error, a stale mount) is the coordinator's trouble, not the worker's: the worker is told
    /// `internal` and closed with 1011, which it retries, never refused with 4001, which three
    /// times over stops it for good; nor is it counted as an authentication failure. Once the
    /// secret can be read, the worker registers.
    #[tokio::test]
    async fn a_secret_the_coordinator_cannot_read_is_no_refusal_and_the_worker_registers_later() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secrets = dir.path().join("secrets");
        std::fs::write(&secrets, "a file where the directory should be").expect("write");
        let secret = tether_proto::auth::Secret::new(b"the worker's own secret").expect("secret");
        let mut cfg = crate::CoordinatorConfig::new("/unused");
        cfg.auth = Some(WorkerAuth {
            fleet: None,
            dir: Some(secrets.clone()),
            max_skew: tether_proto::auth::DEFAULT_MAX_SKEW,
            message_mac: false,
        });
        let mut core = FakeCore::start(cfg, 16).await;
        // More attempts than the refusals that stop a worker.
        for attempt in 1..=4 {
            let mut ws = signed_registration(&core, "w-unread", &secret).await;
            let (error, code) = answer(&mut ws).await;
            let error = error.expect("an error");
            assert_eq!(error["code"], "internal", "attempt {attempt}: {error}");
            assert_eq!(code, Some(CLOSE_INTERNAL), "attempt {attempt}: {error}");
        }
        let failures = core.counters.auth_failures.load(Ordering::Relaxed);
        assert_eq!(failures, 0, "not counted as authentication failures");
        std::fs::remove_file(&secrets).expect("remove");
        std::fs::create_dir(&secrets).expect("mkdir");
        std::fs::write(secrets.join("w-unread"), "the worker's own secret\n").expect("write");
        let _ws = signed_registration(&core, "w-unread", &secret).await;
        let Event::Connected { worker, .. } = core.next().await else {
            panic!("a connection");
        };
        assert_eq!(worker.as_str(), "w-unread");
    }

    /// A refused registration is logged (`ratelimit`) under a kind that holds nothing the
    /// attempt made up (`Refusal::kind`, fixed where the refusal is made), and each reason the
    /// core's check gives has its own: two ids named make one kind, not two.
    #[test]
    fn a_refused_registration_is_logged_under_its_kind_never_under_the_id_it_named() {
        let endpoint = WorkerId::parse("w-endpoint").expect("id");
        let kind = |v: serde_json::Value| {
            let r: Registration = serde_json::from_value(v).expect("a registration");
            let refusal = registration_refusal(&endpoint, &r).expect("refused");
            refusal.kind.as_str()
        };
        let reg = |id: &str| {
            serde_json::json!({
                "worker_id": id,
                "protocol_version": tether_proto::PROTOCOL_VERSION,
                "boot_id": "b-1",
                "capabilities": [],
                "slots": 1,
                "executors": ["sleep"],
                "timestamp": "2026-01-01T00:00:00Z",
            })
        };
        assert_eq!(kind(reg("w-a")), "other_worker");
        assert_eq!(kind(reg("w-b")), "other_worker");
        let mut old = reg("w-endpoint");
        old["protocol_version"] = (tether_proto::PROTOCOL_VERSION + 1).into();
        assert_eq!(kind(old), "incompatible_protocol");
        let mut tiny = reg("w-endpoint");
        tiny["max_frame"] = 1.into();
        assert_eq!(kind(tiny), "frame_limit");
        let mut many = reg("w-endpoint");
        let labels = tether_proto::msg::MAX_WORKER_LABELS + 1;
        many["capabilities"] = (0..labels).map(|n| format!("c{n}")).collect();
        assert_eq!(kind(many), "out_of_bounds");
    }
}
