//! One session: welcome, registration with the inventory, the coordinator's reconciliation
//! directives, outbox replay, then the loop that reads frames, sends the outbox, heartbeats,
//! pings, and declares the session dead after `heartbeat_timeout` without any inbound frame
//! (the only way to notice a silently black-holed network). All timers start with the session.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tether_proto::auth::Challenge;
use tether_proto::codec::decode_coord_batch;
use tether_proto::compress::{InflateError, ZSTD, deflate, inflate};
use tether_proto::drain::while_draining;
use tether_proto::integrity::{
    DEFAULT_MAX_FAILURES, Direction, HMAC_SHA256, MacError, Opener, Sealer, SessionKey,
};
use tether_proto::msg::{
    Batching, CheckpointError, CoordMsg, ErrorCode, ErrorMsg, Heartbeat, HeartbeatAction,
    Inventory, PROTOCOL_VERSION, Registration, RegistrationAck, StopNotice, Telemetry, WorkerMsg,
    now,
};
use tether_proto::settings::MIN_FRAME;
use tether_proto::{Batch, CheckpointId, DecodeError, TaskId, decode_coord, encode, is_batch};
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use crate::adaptive;
use crate::agent::Agent;
use crate::config::WorkerConfig;
use crate::connector::WsStream;
use crate::link;
use crate::metrics as m;
use crate::outbox::{Class, Coalesce, Oversize, frame_fits};
use crate::stats::ConnState;

/// Close codes with which a coordinator refuses a worker for good.
pub const CLOSE_UNAUTHORIZED: u16 = 4001;
pub const CLOSE_INCOMPATIBLE: u16 = 4002;
pub const CLOSE_CONFLICT: u16 = 4003;
/// Close code of a session replaced by a newer connection of the same worker.
pub const CLOSE_REPLACED: u16 = 4009;
/// Close code (policy violation) with which this worker ends a session whose frames failed
/// their integrity tag too often.
const CLOSE_POLICY: u16 = 1008;
/// Close code of a frame larger than the peer takes.
const CLOSE_TOO_BIG: u16 = 1009;

/// Outbox entries sent per batch before the loop looks at inbound frames again.
const SEND_BATCH: usize = 64;
/// Heartbeats remembered for RTT matching.
const PENDING_HEARTBEATS: usize = 16;
/// Bytes queued on the link from which a heartbeat's round trip measures the queue rather
/// than the path: sent while this much of ours waited for acknowledgement, or answered after
/// this much of the coordinator's arrived. Such a sample is left out of the RTT statistics and
/// the adaptive timeout: a checkpoint at 64 kB/s put 3 s in the p95 and 12 s in the timeout
/// (its frames keep the session without them). At that speed a queue under this adds a
/// quarter of a second at most.
const LOADED: usize = 16 * 1024;

/// The end of every reason that says the liveness deadline passed.
const DEAD: &str = "declared dead";

/// Whether a session's end `reason` is the liveness timeout (a silent link), rather than a
/// close, a reset or an error.
pub fn is_liveness_timeout(reason: &str) -> bool {
    reason.ends_with(DEAD)
}

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    Shutdown,
    /// Retrying will not help.
    Refused(String),
    /// Connected but never registered.
    NotRegistered(String),
    /// A registered session was lost.
    Lost {
        /// How long the session was alive: from its registration to the last frame the
        /// coordinator sent, or to the sending of the message it ended for not having
        /// acknowledged when that came first (not to its end, which a silent link puts a
        /// liveness timeout later: a session dead from its start would count as healthy for
        /// that long). What `healthy_after` is held against.
        alive_for: Duration,
        /// From the end of `alive_for` to the loss's detection: how long the link was silent,
        /// or swallowed what was sent, before the session was found lost (about the liveness
        /// timeout for a black hole; little for a close or a reset).
        silent_for: Duration,
        reason: String,
    },
}

enum Ev {
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    /// The session's timer: the liveness deadline or a periodic duty may be due.
    Timer,
    Wake,
    /// The outbox has something new to send.
    Ready,
    /// The worker is to stop: its tasks are told to, while the session serves on.
    Stop,
    /// The tasks stopped (or their grace ran out): what they left is flushed.
    Stopped,
    /// What was left could not all be acknowledged in time.
    FlushTimeout,
    /// An executor queued a reply to send (`Runner::replies`).
    Reply,
}

/// How long a stopping worker's session waits, once its tasks stopped, for the coordinator to
/// acknowledge the results they left before it closes.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// `f` when there is one; never otherwise (a `select!` branch that is not armed).
async fn while_some<F: Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// A session's periodic duties, in the order they are done when due together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Duty {
    Heartbeat,
    Ping,
    Telemetry,
    StatsLog,
}

const DUTIES: [Duty; 4] = [Duty::Heartbeat, Duty::Ping, Duty::Telemetry, Duty::StatsLog];

/// Whether WebSocket pings go out: only when heartbeats (answered by the coordinator, so also
/// proof of the link both ways) are rarer than pings.
fn pings_needed(heartbeat_every: Duration, ping_every: Duration) -> bool {
    heartbeat_every > ping_every
}

/// The longest heartbeat interval a coordinator's budget can ask of a worker.
const MAX_FOLLOWED_INTERVAL: Duration = Duration::from_secs(60);
/// The shortest heartbeat interval a coordinator can ask of a worker: the least either side
/// may be configured with (a shorter one would be a busy loop of heartbeats).
const MIN_FOLLOWED_INTERVAL: Duration = crate::config::MIN_HEARTBEAT_INTERVAL;
/// The longest liveness timeout a coordinator's budget can make a worker wait out: five of
/// the longest intervals it follows. A silent link is still noticed within it, whatever the
/// coordinator says (a timeout of `u64::MAX` ms would put the deadline ages away).
const MAX_FOLLOWED_TIMEOUT: Duration = Duration::from_secs(300);

/// The heartbeat interval a coordinator asked for (`welcome`, heartbeat reply), within
/// [`MIN_FOLLOWED_INTERVAL`] and [`MAX_FOLLOWED_INTERVAL`]; `None` for 0, which asks nothing.
fn followed_interval(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| {
        Duration::from_millis(ms)
            .max(MIN_FOLLOWED_INTERVAL)
            .min(MAX_FOLLOWED_INTERVAL)
    })
}

/// The least liveness timeout a budget's `timeout_ms` sets at the interval `every`: at least
/// two intervals (absent, zero or shorter, the session would be declared dead between two
/// heartbeats), at most [`MAX_FOLLOWED_TIMEOUT`].
fn followed_timeout(ms: Option<u64>, every: Duration) -> Duration {
    Duration::from_millis(ms.unwrap_or(0))
        .max(every.saturating_mul(2))
        .min(MAX_FOLLOWED_TIMEOUT)
}

/// What to add to a refusal of the registration's signature (a wrong secret, as a rule): where
/// this worker's secret comes from. Other refusals (a clock out of the skew window, integrity
/// asked for) say what to fix themselves.
fn secret_hint(e: &ErrorMsg) -> &'static str {
    let wrong_secret = e.code == ErrorCode::Unauthorized
        && e.message
            .contains(&tether_proto::auth::AuthError::BadSignature.to_string());
    match wrong_secret {
        true => " (check this worker's secret: --secret-file, TETHER_SECRET_FILE or TETHER_SECRET)",
        false => "",
    }
}

/// Drives `write` to its end. A stop that comes meanwhile, unless `told` (the tasks were told
/// already), tells the tasks to stop at once and sets `told`: the write goes on (a frame half
/// written cannot be taken back, and a tagged one never written would leave a gap in the tags'
/// count).
async fn through_stop<F: Future>(
    write: F,
    shutdown: &CancellationToken,
    runner: &crate::runner::Runner,
    told: &mut bool,
) -> F::Output {
    tokio::pin!(write);
    loop {
        tokio::select! {
            biased;
            done = &mut write => return done,
            () = shutdown.cancelled(), if !*told => {
                *told = true;
                tracing::info!("stopping while a write waits on the link: the tasks are told to stop now");
                runner.stop_tasks();
            }
        }
    }
}

/// The period of a duty that is not done: it comes due only in a session that lives a year.
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// The periods of the [`DUTIES`], in order, for a session heartbeating every `heartbeat_every`.
/// The ping's is [`NEVER`] when heartbeats are at least as frequent: a ping as well was a third
/// of an idle fleet's messages (docs/PERFORMANCE.md, thirteenth round), and a duty that is
/// skipped when due would still wake the session for nothing.
/// At a heartbeat budget's interval, stretched `budget` times the coordinator's configured one,
/// no pings are sent (they would make up for the frames the coordinator asked its fleet to
/// spare) and telemetry, which costs the coordinator more than a heartbeat, is stretched as much.
fn periods(heartbeat_every: Duration, cfg: &WorkerConfig, budget: Option<f64>) -> [Duration; 4] {
    let ping = match budget.is_none() && pings_needed(heartbeat_every, cfg.ws_ping_interval) {
        true => cfg.ws_ping_interval,
        false => NEVER,
    };
    let telemetry = cfg
        .telemetry_interval
        .mul_f64(budget.unwrap_or(1.0).clamp(1.0, 1e3));
    [heartbeat_every, ping, telemetry, cfg.stats_log_interval]
}

/// When each [`Duty`] is next due. Each is first due at its phase of its first period after
/// the start and keeps its cadence; one done more than a period late is next due a period after
/// it was done, not repeated to catch up (like `tokio::time::MissedTickBehavior::Delay` then).
#[derive(Debug)]
struct Duties {
    next: [Instant; 4],
    every: [Duration; 4],
}

impl Duties {
    /// `every`: the periods, in the order of [`DUTIES`] (at least 1 ms each); `phase`: when
    /// in its first period each is first due, a fraction in (0, 1] (1: a period after `start`).
    fn new(start: Instant, every: [Duration; 4], phase: [f64; 4]) -> Self {
        let every = every.map(|e| e.max(Duration::from_millis(1)));
        let mut next = [start; 4];
        for (i, n) in next.iter_mut().enumerate() {
            *n = start + every[i].mul_f64(phase[i].clamp(f64::EPSILON, 1.0));
        }
        Duties { next, every }
    }

    /// Duties on random phases. A fleet's sessions start together (a restart of the
    /// coordinator reconnects them all within the backoff's jitter), and duties first due a
    /// whole period after the start would stay in step for good: every worker's telemetry
    /// and heartbeat in the same few milliseconds of each period, a burst of store writes at
    /// the coordinator that the messages behind it wait out (docs/PERFORMANCE.md, thirteenth
    /// round). Each first due at a random point of the second half of its first period, they
    /// spread evenly, none comes later than it would have, and none while the fleet's
    /// registrations are still arriving (duties within the first half, heartbeats from 0 s on,
    /// made a 10,000-worker herd's registrations and re-registrations 20-30 % slower).
    fn spread(start: Instant, every: [Duration; 4], rng: &mut impl rand::Rng) -> Self {
        // (0.5, 1].
        Self::new(
            start,
            every,
            std::array::from_fn(|_| 1.0 - 0.5 * rng.random::<f64>()),
        )
    }

    /// New periods from `now` on: a duty whose period changed keeps the share of its current
    /// period still to run (a heartbeat half-way through a 5 s period is due 5 s later if the
    /// period became 10 s).
    fn retune(&mut self, now: Instant, every: [Duration; 4]) {
        let every = every.map(|e| e.max(Duration::from_millis(1)));
        for ((next, old), new) in self.next.iter_mut().zip(&mut self.every).zip(every) {
            if new != *old {
                let left = next.saturating_duration_since(now).as_secs_f64() / old.as_secs_f64();
                *next = now + new.mul_f64(left.clamp(0.0, 1.0));
                *old = new;
            }
        }
    }

    /// Brings `duty` forward to `at` if it is due later; it keeps its period from then on.
    fn bring_forward(&mut self, duty: Duty, at: Instant) {
        if let Some(i) = DUTIES.iter().position(|&d| d == duty) {
            self.next[i] = self.next[i].min(at);
        }
    }

    /// When the first duty is due.
    fn next(&self) -> Instant {
        self.next.into_iter().fold(self.next[0], Instant::min)
    }

    /// The duties due at `now`, each moved on to its next time.
    fn take_due(&mut self, now: Instant) -> impl Iterator<Item = Duty> + use<> {
        let mut due = [None; 4];
        for (i, duty) in DUTIES.into_iter().enumerate() {
            if self.next[i] <= now {
                let on_time = self.next[i] + self.every[i];
                self.next[i] = if on_time > now {
                    on_time
                } else {
                    now + self.every[i]
                };
                due[i] = Some(duty);
            }
        }
        due.into_iter().flatten()
    }
}

/// A received frame's data.
enum Data<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    /// Close, ping or pong.
    Control,
}

enum Inbound {
    Msg(CoordMsg),
    /// The messages of a batch frame, in order.
    Msgs(Vec<CoordMsg>),
    /// Any frame that proves the link is alive but carries no message (ping, pong, bad frame).
    Other,
    Closed(String, Option<u16>),
}

pub(crate) struct Session<'a> {
    agent: &'a mut Agent,
    ws: WsStream,
    generation: u64,
    deadline: Instant,
    /// When the last inbound frame arrived (the session's start before any).
    last_frame: Instant,
    /// When the session ended because what it sent went unacknowledged: the send time of that
    /// message, after which the link was not whole (the coordinator's frames kept coming).
    whole_until: Option<Instant>,
    /// The connection's count of bytes read at the last frame, or at the last look that found
    /// it had grown (a frame arriving, see [`Self::frame_arriving`]).
    read_seen: u64,
    /// The connection's count of bytes written, read while a write waits ([`while_draining`]).
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    timeout: Duration,
    pending_heartbeats: VecDeque<PendingBeat>,
    warned_types: std::collections::HashSet<String>,
    /// Large messages go zstd-compressed both ways (agreed in `registration_ack`).
    zstd: bool,
    /// Outbox entries sent together go in one batch frame, within these bounds (agreed in
    /// `registration_ack`).
    batching: Option<Batching>,
    /// Outbox entries sent in this session and not acknowledged yet.
    window: Window,
    /// The heartbeat period of this session: this worker's, or the coordinator's when shorter
    /// or when it asked for a longer one to keep its fleet within its heartbeat budget.
    heartbeat_every: Duration,
    /// The coordinator's interval of its welcome: one asked later beyond it is a budget's.
    coordinator_every: Duration,
    /// The coordinator asked for a budget's interval (longer than its welcome's).
    budget: bool,
    /// A heartbeat reply retuned the cadence, or brought the report forward (`report_by`):
    /// the duties follow.
    retuned: bool,
    /// The RTT moved far from the one last reported ([`StatsTracker::report_stale`]): the
    /// telemetry duty is brought forward to this time at the latest.
    ///
    /// [`StatsTracker::report_stale`]: crate::stats::StatsTracker::report_stale
    report_by: Option<Instant>,
    /// The coordinator's timeout while it asks for a budget's interval: the session is not
    /// declared dead sooner than the coordinator would close it.
    timeout_floor: Duration,
    /// Tags the frames sent, once the session is keyed (the welcome asked for integrity).
    seal: Option<Box<Sealer>>,
    /// Verifies the frames received, once keyed.
    open: Option<Box<Opener>>,
    /// The largest frame the coordinator takes (its `registration_ack` says; this worker's own
    /// limit when it does not): an outbox entry larger is never sent ([`Outbox::too_large`]).
    ///
    /// [`Outbox::too_large`]: crate::outbox::Outbox::too_large
    max_frame_out: usize,
    /// The coordinator's `registration_ack` came: `max_frame_out` is its limit, and every
    /// message sent directly (not through the outbox) is held to it.
    limit_known: bool,
    /// Bytes of the registration sent, for the refusal of one too large for the coordinator.
    registration_bytes: usize,
    /// A heartbeat's `active_tasks` had to be cut to fit the coordinator's frames (logged once
    /// a session).
    trimmed_heartbeat: bool,
    /// The worker is stopping: assignments are no longer taken.
    draining: bool,
    /// The worker's stop, once the session is registered (never cancelled before).
    stop: CancellationToken,
    /// The tasks were told to stop: at the stop, or by a write it found waiting on the link.
    tasks_told: bool,
    /// When what was in flight was last sent again after a `bad_frame` ([`Self::resend`]):
    /// at most once a liveness timeout, so a coordinator that cannot read what this worker
    /// sends (a bug, not the wire) gets no storm of resends.
    resent_at: Option<Instant>,
    /// A message the coordinator answered `bad_frame` naming its `seq`: sent again at the next
    /// tick of the duties if no ack (a refusal) has taken it out of the outbox by then.
    suspect: Option<u64>,
    /// The outbox's removal count ([`crate::outbox::Outbox::removed`]) when the tasks
    /// reported lost were last checked against it ([`Self::settle_lost`]): what it holds at or
    /// below the replay changes only with a removal, so a frame that removed nothing is not
    /// checked again.
    lost_checked: Option<u64>,
}

impl<'a> Session<'a> {
    pub(crate) fn new(agent: &'a mut Agent, ws: WsStream, generation: u64) -> Self {
        let timeout = agent.cfg.heartbeat_timeout;
        let heartbeat_every = agent.cfg.heartbeat_interval;
        let max_frame_out = agent.cfg.max_frame;
        let read_seen = ws.get_ref().bytes_read();
        let written = ws.get_ref().written();
        let measured = agent.shared.link_bytes_per_sec.load(Ordering::Relaxed);
        let measured = (measured > 0).then_some(measured as f64);
        // The statistics show the timeout this session starts with, not the last one's.
        agent
            .shared
            .heartbeat_timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
        Self {
            agent,
            ws,
            generation,
            deadline: Instant::now() + timeout,
            last_frame: Instant::now(),
            whole_until: None,
            read_seen,
            written,
            timeout,
            pending_heartbeats: VecDeque::new(),
            warned_types: Default::default(),
            zstd: false,
            batching: None,
            window: Window::measured(measured),
            heartbeat_every,
            coordinator_every: Duration::ZERO,
            budget: false,
            retuned: false,
            report_by: None,
            timeout_floor: Duration::ZERO,
            seal: None,
            open: None,
            max_frame_out,
            limit_known: false,
            registration_bytes: 0,
            trimmed_heartbeat: false,
            draining: false,
            stop: CancellationToken::new(),
            tasks_told: false,
            resent_at: None,
            lost_checked: None,
            suspect: None,
        }
    }

    /// Registers, then serves until the session ends. `shutdown` stops a registered session
    /// properly (its tasks handed back); the registration is given up at `give_up` only (a
    /// stop wants the registration of a worker with something to hand back: see
    /// `Agent::run`).
    pub(crate) async fn run(
        mut self,
        shutdown: &CancellationToken,
        give_up: &CancellationToken,
    ) -> SessionEnd {
        let end = match self.register(give_up).await {
            Ok(()) => {
                let registered_at = Instant::now();
                let reason = self.main_loop(shutdown).await;
                match reason {
                    Err(end) => end,
                    Ok(reason) => {
                        let alive = self
                            .whole_until
                            .map_or(self.last_frame, |w| w.min(self.last_frame));
                        SessionEnd::Lost {
                            alive_for: alive.saturating_duration_since(registered_at),
                            silent_for: Instant::now().saturating_duration_since(alive),
                            reason,
                        }
                    }
                }
            }
            Err(end) => end,
        };
        if matches!(end, SessionEnd::Shutdown) {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                self.ws.close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "worker shutting down".into(),
                })),
            )
            .await;
        }
        end
    }

    fn worker(&self) -> &tether_proto::WorkerId {
        &self.agent.cfg.worker_id
    }

    /// Reads one frame, or times out at the liveness deadline.
    async fn recv(&mut self, shutdown: &CancellationToken) -> Result<Inbound, SessionEnd> {
        let frame = tokio::select! {
            f = timeout_at(self.deadline, self.ws.next()) => f,
            _ = shutdown.cancelled() => return Err(SessionEnd::Shutdown),
        };
        match frame {
            Err(_) => Ok(Inbound::Closed(self.dead_reason(), None)),
            Ok(f) => Ok(self.on_frame(f).await),
        }
    }

    /// The session's end when a message sent in it has waited for its acknowledgement longer
    /// than the liveness timeout, with nothing acknowledged since or a later message
    /// acknowledged ([`Window::lost`]): the connection lost what was sent (a middlebox that
    /// swallows bytes and keeps the connection, as a proxy's blackhole does) while the
    /// coordinator's heartbeats still arrive, and the message would wait in the outbox for as
    /// long as the session lasts. A new session sends it again (the coordinator keeps one of
    /// each).
    /// With the reason, when the message was sent: the link was not whole since.
    fn unacknowledged(&self) -> Option<(String, Instant)> {
        let (seq, at) = self.window.lost(self.timeout)?;
        let reason = format!(
            "message {seq} sent {} ms ago is not acknowledged: the connection lost what was sent",
            at.elapsed().as_millis()
        );
        Some((reason, at))
    }

    /// Looks whether bytes were read since the last frame or the last look (the timer's, at
    /// least every heartbeat interval): if so, a frame from the coordinator is arriving, slower
    /// than the heartbeats (a checkpoint's piece on a slow link). The coordinator is then
    /// alive, and its answers to this worker's messages wait behind that frame: the liveness
    /// deadline and the acknowledgement window's watch count from now.
    fn frame_arriving(&mut self) {
        let read = self.ws.get_ref().bytes_read();
        if read != self.read_seen {
            self.read_seen = read;
            let now = Instant::now();
            self.deadline = self.deadline.max(now + self.timeout);
            self.window.heard(now);
        }
    }

    /// A frame from the coordinator came: the liveness deadline counts from now.
    fn alive(&mut self) {
        self.last_frame = Instant::now();
        self.deadline = self.last_frame + self.timeout;
    }

    fn dead_reason(&self) -> String {
        m::observe(m::DEAD_DETECT, self.last_frame.elapsed());
        format!("no frame for {} ms: {DEAD}", self.timeout.as_millis())
    }

    /// Classifies one frame. Every frame moves the liveness deadline, but in a keyed session
    /// only one that verified: a data frame or a ping with its tag. Pongs, untagged pings and
    /// frames that fail their tags are not the coordinator (whoever holds the path could keep
    /// a black-holed session alive with them, and its tasks would run here and elsewhere).
    async fn on_frame(
        &mut self,
        frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Inbound {
        let frame = match frame {
            None => return Inbound::Closed("connection closed".into(), None),
            Some(Err(e)) => return Inbound::Closed(format!("read: {e}"), None),
            Some(Ok(m)) => m,
        };
        // Whatever it is, the bytes read so far are whole frames: only a frame still arriving
        // shows in the count from now (see `frame_arriving`).
        self.read_seen = self.ws.get_ref().bytes_read();
        let ping = match (&frame, self.open.as_deref_mut()) {
            (Message::Ping(payload), Some(o)) => Some(o.open_ping(payload)),
            (Message::Ping(_), None) => Some(true),
            _ => None,
        };
        if self.open.is_none() || ping == Some(true) {
            self.alive();
        }
        if ping == Some(true) {
            // The coordinator pings only while a frame of this worker's is still arriving
            // (a long one on a slow link), behind which this worker's later messages wait:
            // what was sent is being read, not lost.
            self.window.heard(self.last_frame);
            // Or while its session does not read (its core held up), or a commit is: the
            // heartbeats unanswered now wait in a queue, and their round trips, answered in a
            // burst once it reads again, would measure it (seconds, a minute) rather than the
            // path, and raise the timeout to its cap for as long as they stayed in the window.
            for beat in &mut self.pending_heartbeats {
                beat.queued = true;
            }
        }
        // The frame's data, its tag checked and dropped when the session is keyed.
        let data = match (&frame, self.open.as_deref_mut()) {
            (Message::Text(t), Some(o)) => o.open_text(t.as_str()).map(Data::Text),
            (Message::Binary(b), Some(o)) => o.open_binary(b).map(Data::Binary),
            (Message::Text(t), None) => Ok(Data::Text(t.as_str())),
            (Message::Binary(b), None) => Ok(Data::Binary(b)),
            _ => Ok(Data::Control),
        };
        if self.open.is_some() && matches!(data, Ok(Data::Text(_) | Data::Binary(_))) {
            self.alive();
        }
        match data {
            Err(e) => self.on_bad_tag(&frame, e).await,
            Ok(Data::Text(text)) => self.on_text(text).await,
            Ok(Data::Binary(b)) if self.zstd => match inflate(b, self.agent.cfg.max_frame) {
                Ok(text) => {
                    crate::metrics::record_compression(text.len() as u64, b.len() as u64);
                    self.on_text(&text).await
                }
                Err(e @ InflateError::TooBig { .. }) => Inbound::Closed(e.to_string(), None),
                Err(e) => {
                    self.agent.shared.bad_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(worker = %self.worker(), error = %e, "undecodable compressed frame from coordinator");
                    Inbound::Other
                }
            },
            Ok(Data::Binary(_)) => {
                self.agent.shared.bad_frames.fetch_add(1, Ordering::Relaxed);
                Inbound::Other
            }
            Ok(Data::Control) => Self::on_control(frame),
        }
    }

    /// A close, ping or pong frame.
    fn on_control(frame: Message) -> Inbound {
        match frame {
            Message::Close(frame) => {
                let code = frame.as_ref().map(|f| u16::from(f.code));
                let reason = frame
                    .map(|f| format!("closed by coordinator: {} {}", u16::from(f.code), f.reason))
                    .unwrap_or_else(|| "closed by coordinator".into());
                Inbound::Closed(reason, code)
            }
            // Data frames are handled by `on_frame`.
            _ => Inbound::Other,
        }
    }

    /// A frame whose tag did not verify is dropped and counted; too many end the session (a new
    /// one starts with a fresh key). Before the first verified frame, an untagged `error` is
    /// still read: a coordinator that refuses the registration cannot tag its refusal (a
    /// worker that requires integrity does not take it as one: `refusal_or_retry`).
    async fn on_bad_tag(&mut self, frame: &Message, e: MacError) -> Inbound {
        let verified = self.open.as_ref().map_or(0, |o| o.verified());
        if verified == 0
            && let Message::Text(t) = frame
            && let Ok(CoordMsg::Error(refusal)) = decode_coord(t.as_str())
        {
            return Inbound::Msg(CoordMsg::Error(refusal));
        }
        let failures = self.open.as_ref().map_or(0, |o| o.failures());
        self.agent
            .shared
            .mac_failures
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::MAC_FAILURES).increment(1);
        tracing::warn!(worker = %self.worker(), error = %e, failures, "frame from coordinator dropped: integrity tag");
        self.agent.event(crate::eventlog::Event::TagFailed {
            generation: self.generation,
            failures,
        });
        if failures < DEFAULT_MAX_FAILURES {
            return Inbound::Other;
        }
        let reason = format!("{failures} frames from the coordinator failed their integrity tag");
        let close = self.ws.close(Some(CloseFrame {
            code: CloseCode::from(CLOSE_POLICY),
            reason: "too many frames failed their integrity tag".into(),
        }));
        let _ = timeout_at(self.deadline, close).await;
        Inbound::Closed(reason, None)
    }

    /// Decodes one frame's text (a message, or a batch when this worker offered batching); an
    /// undecodable message is answered with `error`, the others of its batch are kept.
    async fn on_text(&mut self, text: &str) -> Inbound {
        if !is_batch(text) {
            return match decode_coord(text) {
                Ok(msg) => {
                    m::MESSAGES_IN_BY_TYPE.increment(msg.type_name());
                    Inbound::Msg(msg)
                }
                Err(e) => {
                    self.on_undecodable(e).await;
                    Inbound::Other
                }
            };
        }
        let decoded = match self.agent.cfg.batching {
            true => decode_coord_batch(text, u32::MAX),
            false => Err(DecodeError::Malformed {
                ty: None,
                seq: None,
                reason: "batch frame, and this worker did not offer batching".into(),
            }),
        };
        let mut msgs = Vec::new();
        for d in decoded.unwrap_or_else(|e| vec![Err(e)]) {
            match d {
                Ok(msg) => {
                    m::MESSAGES_IN_BY_TYPE.increment(msg.type_name());
                    msgs.push(msg);
                }
                Err(e) => self.on_undecodable(e).await,
            }
        }
        Inbound::Msgs(msgs)
    }

    /// Counts an undecodable message, warns once per type, and tells the coordinator.
    async fn on_undecodable(&mut self, e: DecodeError) {
        self.agent.shared.bad_frames.fetch_add(1, Ordering::Relaxed);
        let ty = e.offending_type().unwrap_or_default();
        if self.warned_types.insert(ty) {
            tracing::warn!(worker = %self.worker(), error = %e, "undecodable frame from coordinator");
        }
        let code = match e {
            DecodeError::UnknownType { .. } => ErrorCode::UnknownType,
            DecodeError::Malformed { .. } => ErrorCode::BadFrame,
        };
        let reply = WorkerMsg::Error(ErrorMsg {
            code,
            message: e.to_string(),
            offending_type: e.offending_type(),
            ref_seq: e.seq(),
            timestamp: now(),
        });
        let _ = self.send(&reply).await;
    }

    /// The frame of `text` (one message or a batch): text, or zstd in a binary frame when
    /// agreed and large enough. Tagged once the session is keyed.
    fn frame_text(&mut self, text: String) -> Message {
        if self.zstd && text.len() >= self.agent.cfg.compress_threshold {
            let packed = deflate(&text);
            crate::metrics::record_compression(text.len() as u64, packed.len() as u64);
            match &mut self.seal {
                Some(seal) => Message::binary(seal.seal_binary(packed)),
                None => Message::binary(packed),
            }
        } else {
            match &mut self.seal {
                Some(seal) => Message::text(seal.seal_text(text)),
                None => Message::text(text),
            }
        }
    }

    /// Sends a message directly (not through the outbox). Once the coordinator has said its
    /// frame limit, a message larger is not sent (it would end the session, close 1009): it
    /// is dropped, logged and counted in `tether_worker_oversize_messages_total`. Counted as
    /// sent once its frame is written.
    async fn send(&mut self, msg: &WorkerMsg) -> Result<(), String> {
        self.send_sized(msg).await.map(|_| ())
    }

    /// [`Self::send`], saying how many bytes of JSON the message was.
    async fn send_sized(&mut self, msg: &WorkerMsg) -> Result<usize, String> {
        let text = encode(msg);
        let bytes = text.len();
        if self.limit_known && !frame_fits(bytes, self.max_frame_out) {
            let ty = msg.type_name();
            metrics::counter!(m::OVERSIZE, "type" => ty).increment(1);
            tracing::error!(worker = %self.worker(), r#type = ty, bytes, limit = self.max_frame_out, "a message is larger than the coordinator's frames take; it is dropped, not sent");
            return Ok(bytes);
        }
        let frame = self.frame_text(text);
        let send = self.ws.send(frame);
        let write = while_draining(send, &mut self.deadline, self.timeout, &self.written);
        write_result(
            through_stop(write, &self.stop, &self.agent.runner, &mut self.tasks_told).await,
        )?;
        count_out(msg);
        // Sent at once whatever the pace (a heartbeat must not wait), and counted in it: the
        // outbox yields what it took.
        if let Some(p) = &mut self.agent.pace {
            p.sent_aside(bytes);
        }
        Ok(bytes)
    }

    /// `worker_stopped`: the coordinator may move what it still leases to this worker now.
    async fn say_stopped(&mut self) {
        let stopped = WorkerMsg::WorkerStopped(StopNotice { timestamp: now() });
        match self.send(&stopped).await {
            Ok(()) => self.agent.runner.handed_back().await,
            Err(reason) => {
                tracing::warn!(worker = %self.worker(), %reason, "worker_stopped not sent; the coordinator's grace period moves the tasks (the next start reports the tasks it stopped lost)");
            }
        }
    }

    /// The end of a session closed by the coordinator before it registered. A close 1009
    /// after the registration went out says the registration is larger than the coordinator
    /// takes: sent again it would be closed again, for ever, so it is a refusal (the worker
    /// stops, saying why, after `refusals_before_stop` of them), not a reconnect.
    ///
    /// A close carries no tag: a worker that requires integrity takes none as a refusal
    /// ([`Session::unproven`]).
    fn closed_end(&self, reason: String, code: Option<u16>) -> SessionEnd {
        let refusal = match code {
            Some(CLOSE_UNAUTHORIZED | CLOSE_INCOMPATIBLE | CLOSE_CONFLICT) => reason,
            Some(CLOSE_TOO_BIG) if self.registration_bytes > 0 => format!(
                "the coordinator closed the connection at this worker's registration of {} \
                 bytes as larger than its frames take (1009: {reason}); shorten the worker's \
                 tags or capabilities, or raise the coordinator's --max-frame",
                self.registration_bytes
            ),
            _ => return SessionEnd::NotRegistered(reason),
        };
        match self.agent.cfg.require_message_mac {
            true => self.unproven(refusal),
            false => SessionEnd::Refused(refusal),
        }
    }

    /// A refusal without a verified tag, read by a worker that requires integrity: anyone on
    /// the path could have sent it, and counted as refusals three such forgeries would stop
    /// the worker for good. It is retried as a failed attempt (with backoff), never counted.
    /// The price: a coordinator that really refuses this worker (a wrong secret, whose session
    /// key cannot match) cannot tag its refusal either, so such a worker keeps trying, saying
    /// why each time, rather than stop.
    fn unproven(&self, refusal: String) -> SessionEnd {
        tracing::warn!(worker = %self.worker(), generation = self.generation, %refusal, "refused without an integrity tag, which anyone on the path could forge: not taken as the coordinator's refusal since this worker requires integrity (--message-mac); trying again (if this goes on, check this worker's secret)");
        SessionEnd::NotRegistered(format!("untagged refusal, not trusted: {refusal}"))
    }

    /// A welcome this worker cannot key a session from. It carries no tag (none can exist
    /// before the key), so for a worker that requires integrity (`--message-mac`) it is no
    /// proof of the coordinator's setup: a byte flipped on the wire (`"hiac-sha256"`, a key
    /// name, the nonce) reads the same as a coordinator set up otherwise, and three such on a
    /// corrupting link would stop the worker for good. Retried with backoff, warned each time,
    /// never counted as a refusal; the coordinator's own refusals (a tagged `error`, a 401 or
    /// 403 at the upgrade) still stop it. Without `--message-mac`, a refusal as before.
    fn unverified(&self, reason: String) -> SessionEnd {
        if !self.agent.cfg.require_message_mac {
            return SessionEnd::Refused(reason);
        }
        tracing::warn!(worker = %self.worker(), generation = self.generation, %reason, "the coordinator's welcome does not allow the integrity this worker requires (--message-mac); an untagged welcome may have been damaged on the wire or forged, so trying again with backoff (if this goes on, the coordinator is set up without --message-mac or with another secret scheme)");
        SessionEnd::NotRegistered(format!("welcome not usable: {reason}"))
    }

    /// Sends the registration, remembering its size.
    async fn send_registration(&mut self, reg: &WorkerMsg) -> Result<(), SessionEnd> {
        if let WorkerMsg::Registration(r) = reg {
            self.agent.lost_through = r.inventory.replay_through;
        }
        self.registration_bytes = self
            .send_sized(reg)
            .await
            .map_err(SessionEnd::NotRegistered)?;
        Ok(())
    }

    async fn register(&mut self, shutdown: &CancellationToken) -> Result<(), SessionEnd> {
        // 1. welcome. A worker without a secret puts nothing of the welcome in its
        // registration (no signature over its nonce, no session key), so it sends the
        // registration first: the coordinator finds it waiting once its welcome is out, a round
        // trip and a wake-up sooner on both sides, which counts when a fleet reconnects at once.
        // Its endpoint URL says so, and a coordinator that asks no authentication then writes
        // the welcome with the acknowledgement. The welcome is still read and checked before
        // the acknowledgement is taken.
        let sent_first = crate::agent::registers_first(&self.agent.cfg);
        if sent_first {
            let reg = self.registration(now(), None, None);
            self.send_registration(&reg).await?;
        }
        let welcome = loop {
            match self.recv(shutdown).await? {
                Inbound::Msg(CoordMsg::Welcome(w)) => break w,
                Inbound::Msg(CoordMsg::Error(e)) => return Err(self.refusal_or_retry(&e)),
                Inbound::Msg(other) => {
                    return Err(SessionEnd::NotRegistered(format!(
                        "expected welcome, got {}",
                        other.type_name()
                    )));
                }
                Inbound::Other | Inbound::Msgs(_) => continue,
                Inbound::Closed(r, code) => return Err(self.closed_end(r, code)),
            }
        };
        // The welcome carries no tag (there is no key yet), so a frame damaged on the wire
        // must not stop the worker for good: these are retried. The coordinator's own refusal
        // of an incompatible registration (`error`, close 4002) is what stops it.
        if welcome.protocol_version != PROTOCOL_VERSION {
            return Err(SessionEnd::NotRegistered(format!(
                "coordinator's welcome says protocol {}, this worker speaks {}",
                welcome.protocol_version, PROTOCOL_VERSION
            )));
        }
        if &welcome.worker_id != self.worker() {
            return Err(SessionEnd::NotRegistered(format!(
                "coordinator welcomed {} but this worker is {}",
                welcome.worker_id,
                self.worker()
            )));
        }
        // The coordinator closes a session silent for its own timeout, which it sized for
        // its heartbeat interval: never beat slower than it asks (within bounds).
        let asked = followed_interval(welcome.heartbeat_interval_ms);
        self.coordinator_every = asked.unwrap_or(Duration::ZERO);
        if let Some(asked) = asked
            && asked < self.heartbeat_every
        {
            tracing::info!(worker = %self.worker(), ours_ms = self.heartbeat_every.as_millis() as u64, coordinator_ms = welcome.heartbeat_interval_ms, "using the coordinator's shorter heartbeat interval");
            self.heartbeat_every = asked;
        }
        self.agent
            .shared
            .heartbeat_interval_ms
            .store(self.heartbeat_every.as_millis() as u64, Ordering::Relaxed);
        // 2. registration with the inventory, signed over the nonce when one was given
        let a = &*self.agent;
        let timestamp = now();
        let signature = match (&welcome.nonce, &a.cfg.secret) {
            (Some(nonce), Some(secret)) => Some(
                Challenge {
                    worker: &a.cfg.worker_id,
                    nonce,
                    timestamp,
                    boot_id: &a.boot_id,
                }
                .sign(secret),
            ),
            (Some(_), None) => {
                return Err(SessionEnd::Refused(
                    "the coordinator requires authentication and this worker has no secret \
                     (give --secret-file, TETHER_SECRET_FILE or TETHER_SECRET)"
                        .into(),
                ));
            }
            (None, Some(_)) => {
                if !a.warned_unauthenticated {
                    tracing::warn!(worker = %a.cfg.worker_id, "the coordinator does not ask workers to authenticate; registering without a signature");
                }
                None
            }
            (None, None) => None,
        };
        self.agent.warned_unauthenticated |=
            welcome.nonce.is_none() && self.agent.cfg.secret.is_some();
        let client_nonce = self.key_session(&welcome)?;
        if !sent_first {
            let reg = self.registration(timestamp, signature, client_nonce);
            self.send_registration(&reg).await?;
        }
        // 3. the coordinator's decisions; anything else that arrives first is kept for after.
        // The wait is bounded by liveness only (`recv`: every frame, a ping among them, moves
        // the deadline): the ack follows the commit of the registration's reconciliation, and
        // a coordinator whose commit is held up (its disk full) pings until it can send it.
        let mut early = Vec::new();
        let ack = loop {
            match self.recv(shutdown).await? {
                Inbound::Msg(CoordMsg::RegistrationAck(ack)) => break ack,
                Inbound::Msg(CoordMsg::Error(e)) => return Err(self.refusal_or_retry(&e)),
                Inbound::Msg(CoordMsg::Heartbeat(_)) | Inbound::Other => continue,
                Inbound::Msg(other) if early.len() < 1024 => early.push(other),
                Inbound::Msgs(msgs) if early.len() + msgs.len() <= 1024 => early.extend(msgs),
                Inbound::Msgs(_) => {
                    return Err(SessionEnd::NotRegistered(
                        "no registration_ack; got more than 1024 messages".into(),
                    ));
                }
                Inbound::Msg(other) => {
                    return Err(SessionEnd::NotRegistered(format!(
                        "no registration_ack; got {} and more",
                        other.type_name()
                    )));
                }
                Inbound::Closed(r, code) => return Err(self.closed_end(r, code)),
            }
        };
        let odd = odd_in_ack(&ack);
        if odd != self.agent.warned_ack {
            for what in &odd {
                tracing::warn!(worker = %self.worker(), "the coordinator's registration_ack: {what}");
            }
            self.agent.warned_ack = odd;
        }
        self.zstd = self.agent.cfg.compression && ack.compression.as_deref() == Some(ZSTD);
        self.batching = ack.batching.filter(|_| self.agent.cfg.batching);
        self.agent.runner.apply_directives(&ack.directives);
        // Every session: a coordinator restarted with another limit says so in its ack.
        self.max_frame_out = peer_max_frame(ack.max_frame, self.agent.cfg.max_frame);
        self.limit_known = true;
        self.registration_bytes = 0;
        self.agent
            .runner
            .limit_frames_to(self.max_frame_out, self.agent.cfg.max_frame);
        self.agent.runner.limit_checkpoints_to(ack.max_checkpoint);
        // Every session too: a coordinator restarted with another grace says so.
        self.agent.grace = ack.lost_after_ms.map(Duration::from_millis);
        // The coordinator's rates: paced below them, the levels kept across sessions.
        self.agent.pace = crate::pace::Pace::follow(
            self.agent.pace.take(),
            ack.message_rate,
            ack.byte_rate,
            Instant::now(),
        );
        self.settle_lost();
        let outage = self.agent.shared.stats().on_registered();
        if let Some(d) = outage {
            metrics::counter!(m::RECONNECTIONS).increment(1);
            m::observe(m::RECONNECT_DURATION, d);
        }
        self.agent
            .shared
            .registered_unix_us
            .store(crate::agent::unix_us(), Ordering::Relaxed);
        self.agent
            .shared
            .registrations
            .fetch_add(1, Ordering::Relaxed);
        self.agent.shared.set_state(ConnState::Connected);
        self.agent.event(crate::eventlog::Event::Registered {
            generation: self.generation,
            session_id: ack.session_id,
        });
        self.agent.outbox.requeue_all();
        // No report of the connection's statistics rides the registration: one a worker at
        // each (re)registration cost a herd of 10,000 (re-registered after 2,121 ms against
        // 1,492, idle CPU 11.1 % against 5.6 %, one run each, session 56); the coordinator
        // shows each report's age beside it until the next, a telemetry interval on.
        tracing::info!(
            worker = %self.worker(),
            generation = self.generation,
            session = ack.session_id,
            directives = ack.directives.len(),
            replay = self.agent.outbox.len(),
            outage_ms = outage.map(|d| d.as_millis() as u64),
            "registered"
        );
        for m in early {
            if let Err(reason) = self.handle(m).await {
                return Err(SessionEnd::Lost {
                    alive_for: Duration::ZERO,
                    silent_for: Duration::ZERO,
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Forgets the tasks reported lost once the coordinator has them (its registration ack
    /// came) and nothing is held here at or below the `replay_through` that registration gave:
    /// until then the coordinator holds their leases for the checkpoints the replay may bring,
    /// and a coordinator restarted meanwhile (which forgot that hold) learns of them again at
    /// the next registration instead of sending the dead attempt back as if still running.
    fn settle_lost(&mut self) {
        let agent = &mut *self.agent;
        if agent.lost.is_empty() {
            return;
        }
        if let Some(through) = agent.lost_through {
            // Entries are numbered past `through` once it is set: only a removal can end what
            // is held at or below it. One pass over the outbox a removal, not a frame.
            let removed = agent.outbox.removed();
            if self.lost_checked == Some(removed) {
                return;
            }
            self.lost_checked = Some(removed);
            if agent.outbox.holds_through(through) {
                return;
            }
        }
        tracing::info!(worker = %agent.cfg.worker_id, tasks = agent.lost.len(), through = ?agent.lost_through.map(|s| s.0), "the coordinator has the tasks that died with the previous process and what that process sent; no longer reported lost");
        agent.lost.clear();
        agent.lost_through = None;
        agent.lost_settled.send_replace(true);
    }

    /// This worker's registration: who it is, what it can run, and its inventory (running,
    /// finished but unacknowledged, lost), signed when the welcome asked.
    fn registration(
        &self,
        timestamp: chrono::DateTime<chrono::Utc>,
        signature: Option<String>,
        client_nonce: Option<String>,
    ) -> WorkerMsg {
        let a = &*self.agent;
        WorkerMsg::Registration(Registration {
            worker_id: a.cfg.worker_id.clone(),
            protocol_version: PROTOCOL_VERSION,
            boot_id: a.boot_id.clone(),
            capabilities: a.cfg.capabilities.clone(),
            tags: a.cfg.tags.clone(),
            slots: a.cfg.slots,
            executors: a.runner.executors().kinds(),
            inventory: Inventory {
                running: a.runner.active(),
                finished: a.outbox.pending_results(),
                lost: a.lost.clone(),
                acked_seq: a.outbox.acked_max(),
                // What the replay after this registration reaches: the dead process's
                // checkpoints among it come before its lost tasks are requeued.
                // (The outbox is scanned only when something was lost: rarely.)
                replay_through: if a.lost.is_empty() {
                    None
                } else {
                    a.outbox.last_pending()
                },
            },
            signature,
            compression: if a.cfg.compression {
                vec![ZSTD.to_owned()]
            } else {
                Vec::new()
            },
            client_nonce,
            max_frame: Some(a.cfg.max_frame as u64),
            batching: a.cfg.batching,
            compact_acks: a.cfg.compact_acks,
            checkpoint_fetch: true,
            // What the wait for the ack is bounded by (every session starts at the configured
            // timeout; the adaptive one only follows heartbeat replies, after the ack): the
            // coordinator paces its pings meanwhile by it, at most a third of it apart.
            heartbeat_timeout_ms: Some(self.timeout.as_millis().try_into().unwrap_or(u64::MAX)),
            timestamp,
        })
    }

    /// When the welcome asks for per-message integrity: a fresh client nonce, and the session
    /// key both sides derive from it, the secret and the welcome's nonce. From the
    /// registration on, every frame sent carries a tag and every frame received must.
    fn key_session(
        &mut self,
        welcome: &tether_proto::msg::Welcome,
    ) -> Result<Option<String>, SessionEnd> {
        let cfg = &self.agent.cfg;
        let (integrity, nonce, secret) = match (&welcome.integrity, &welcome.nonce, &cfg.secret) {
            (None, _, _) if cfg.require_message_mac => {
                return Err(self.unverified(
                    "this worker requires per-message integrity (--message-mac) and the \
                     coordinator does not ask for it (start it with --message-mac, or check \
                     what sits between the two)"
                        .into(),
                ));
            }
            (None, _, _) => return Ok(None),
            (Some(i), Some(n), Some(s)) => (i, n, s),
            (Some(_), _, _) => {
                return Err(self.unverified(
                    "the coordinator asks for per-message integrity without an authentication \
                     nonce, or this worker has no secret"
                        .into(),
                ));
            }
        };
        if integrity != HMAC_SHA256 {
            return Err(self.unverified(format!(
                "the coordinator asks for integrity {integrity:?}; this worker knows {HMAC_SHA256:?}"
            )));
        }
        let client_nonce =
            tether_proto::auth::to_hex(&rand::random::<[u8; tether_proto::auth::NONCE_BYTES]>());
        let key = SessionKey::derive(secret, &cfg.worker_id, nonce, &client_nonce);
        self.seal = Some(Box::new(Sealer::new(key.clone(), Direction::ToCoordinator)));
        self.open = Some(Box::new(Opener::new(key, Direction::ToWorker)));
        Ok(Some(client_nonce))
    }

    fn refusal_or_retry(&self, e: &ErrorMsg) -> SessionEnd {
        metrics::counter!(m::ERRORS, "code" => e.code.as_str(), "direction" => "received")
            .increment(1);
        self.agent
            .shared
            .errors_received
            .fetch_add(1, Ordering::Relaxed);
        // Only an `error` whose tag verified came from the coordinator: before the key there is
        // no tag, and after it an untagged one is let through only as the first frame
        // (`on_bad_tag`), so a verified frame so far is this one.
        let tagged = self.open.as_ref().is_some_and(|o| o.verified() > 0);
        let hint = secret_hint(e);
        match e.code {
            ErrorCode::IncompatibleProtocol | ErrorCode::Unauthorized
                if self.agent.cfg.require_message_mac && !tagged =>
            {
                self.unproven(format!("{}: {}{hint}", e.code.as_str(), e.message))
            }
            ErrorCode::IncompatibleProtocol | ErrorCode::Unauthorized => {
                SessionEnd::Refused(format!("{}{hint}", e.message))
            }
            _ => SessionEnd::NotRegistered(format!("{}: {}", e.code.as_str(), e.message)),
        }
    }

    /// Returns `Ok(reason)` when the session is lost, `Err(end)` for shutdown or refusal.
    async fn main_loop(&mut self, shutdown: &CancellationToken) -> Result<String, SessionEnd> {
        let cfg = self.agent.cfg.clone();
        let mut duties = Duties::spread(
            Instant::now(),
            periods(self.heartbeat_every, &cfg, self.stretch()),
            // The agent's generator: a run with a seed (`WorkerConfig::seed`) replays.
            &mut self.agent.rng,
        );
        let outbox = self.agent.outbox.clone();
        // Made once, not per event: each would register with the token, and the timer with
        // the timer wheel, only to leave again at the end of the round. The wait for shutdown
        // is polled only once the token woke the task (each poll of it takes two locks). One
        // timer serves the liveness deadline and the periodic duties (one timer per duty was
        // four more wakers registered every round). It is moved lazily: every frame moves the
        // deadline, and only when the timer fires at a deadline that has since moved on is it
        // set again (at once when a shorter timeout brings the deadline forward).
        let stop = crate::woken::when_woken(shutdown.cancelled());
        tokio::pin!(stop);
        self.stop = shutdown.clone();
        let mut armed = duties.next().min(self.deadline);
        let timer = sleep_until(armed);
        tokio::pin!(timer);
        // A shutdown in two steps, the session serving throughout: the tasks are stopped
        // (the runner's grace), and what they leave is sent, then acknowledged within
        // SHUTDOWN_FLUSH; only then does the session close. Results queued, and those of tasks
        // that end within the grace, reach the coordinator before it sees the close.
        let mut stopping: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> = None;
        let mut flushing: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let replies = self.agent.runner.clone();
        loop {
            if outbox.has_unsent()
                && let Err(reason) = self.flush_outbox().await
            {
                return Ok(reason);
            }
            // A task deaf to its stop may outlive the shutdown grace: see `Ev::FlushTimeout`.
            if flushing.is_some()
                && outbox.holds_only_telemetry()
                && self.agent.runner.live_tasks() == 0
            {
                // Every task stopped and all they left acknowledged (results, and the last
                // checkpoints they may have written as they stopped): what the coordinator
                // still leases to this worker will never report, so it may move it now. A
                // last checkpoint whose pieces are still waiting for room (queued on after the
                // stop, `command::queue_after_stop`) is not in the outbox yet: with the
                // default bounds room is there by now; otherwise `handed_back` keeps it here,
                // the coordinator not holding it whole.
                tracing::info!(worker = %self.worker(), "everything the tasks left is acknowledged; closing");
                self.say_stopped().await;
                return Err(SessionEnd::Shutdown);
            }
            if self.deadline < armed {
                armed = self.deadline;
                timer.as_mut().reset(armed);
            }
            // More to send and room in the window: come straight back after any ready event.
            // Held back by the pace: the timer wakes the loop when a gathering may go.
            let unsent = outbox.has_unsent();
            let paced = unsent.then(|| self.paced_until()).flatten();
            if let Some(at) = paced
                && at < armed
            {
                armed = at;
                timer.as_mut().reset(armed);
            }
            let more = unsent && paced.is_none() && self.window.bytes < self.window.limit;
            if self.window.held_back(unsent && paced.is_none() && !more) {
                self.agent
                    .shared
                    .send_window_full
                    .fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::SEND_WINDOW_FULL).increment(1);
            }
            let ev = tokio::select! {
                biased;
                _ = &mut stop, if !self.draining => Ev::Stop,
                _ = while_some(&mut stopping) => Ev::Stopped,
                _ = while_some(&mut flushing) => Ev::FlushTimeout,
                f = self.ws.next() => Ev::Frame(f),
                _ = &mut timer => Ev::Timer,
                _ = replies.replies().ready() => Ev::Reply,
                _ = outbox.ready(), if !unsent => Ev::Ready,
                _ = std::future::ready(()), if more => Ev::Wake,
            };
            match ev {
                Ev::Stop => {
                    self.draining = true;
                    tracing::info!(worker = %self.worker(), "stopping: the tasks are told to stop, the session serves on");
                    // No new task comes once the coordinator reads this.
                    let notice = WorkerMsg::WorkerStopping(StopNotice { timestamp: now() });
                    if let Err(reason) = self.send(&notice).await {
                        // The tasks stop all the same; the session's end shows in its next read.
                        tracing::warn!(worker = %self.worker(), %reason, "worker_stopping not sent");
                    }
                    self.tasks_told = true;
                    let runner = self.agent.runner.clone();
                    stopping = Some(Box::pin(async move {
                        runner.shutdown(crate::agent::SHUTDOWN_GRACE).await;
                    }));
                }
                Ev::Stopped => {
                    stopping = None;
                    flushing = Some(Box::pin(tokio::time::sleep(SHUTDOWN_FLUSH)));
                }
                Ev::FlushTimeout => {
                    let left = outbox.pending_results().len();
                    let running = self.agent.runner.live_tasks();
                    if running > 0 {
                        // A task deaf to its stop past the grace still runs here: said stopped,
                        // the coordinator would hand it to another worker while it runs on.
                        // Its lease stays for the grace period, as after a crash.
                        tracing::warn!(worker = %self.worker(), running, "tasks still run past the shutdown grace; closing without saying stopped (their leases stay for the coordinator's grace period)");
                    } else if left == 0 {
                        // Every result is in: what did not make it (a state, a checkpoint) is
                        // progress, not a result; the tasks move now, from the checkpoints
                        // the coordinator has. A stopped attempt's checkpoint it does not hold
                        // complete stays here (`handed_back`), for the task to resume from
                        // should it come back to this worker.
                        tracing::warn!(worker = %self.worker(), held = outbox.len(), "states or checkpoints not acknowledged within the shutdown flush, every result was; closing");
                        self.say_stopped().await;
                    } else {
                        tracing::warn!(worker = %self.worker(), left, "results not acknowledged within the shutdown flush; closing (they stay journaled when the worker has a state directory)");
                    }
                    return Err(SessionEnd::Shutdown);
                }
                Ev::Frame(f) => {
                    match self.on_frame(f).await {
                        Inbound::Msg(m) => {
                            if let Err(reason) = self.handle(m).await {
                                return Ok(reason);
                            }
                        }
                        Inbound::Msgs(msgs) => {
                            for m in msgs {
                                if let Err(reason) = self.handle(m).await {
                                    return Ok(reason);
                                }
                            }
                        }
                        Inbound::Other => {}
                        // Registered, a close is no refusal, whatever its code: the next
                        // registration gets the coordinator's answer. A close carries no tag,
                        // and forged ones (4001-4003) would otherwise stop a worker for good.
                        // A process replaced by a newer one under its id (closed 4003) is
                        // refused at that registration.
                        Inbound::Closed(reason, _) => return Ok(reason),
                    }
                    self.settle_lost();
                    if std::mem::take(&mut self.retuned) {
                        let every = periods(self.heartbeat_every, &cfg, self.stretch());
                        duties.retune(Instant::now(), every);
                        if let Some(at) = self.report_by.take() {
                            duties.bring_forward(Duty::Telemetry, at);
                        }
                        armed = duties.next().min(self.deadline);
                        timer.as_mut().reset(armed);
                    }
                }
                Ev::Timer => {
                    self.frame_arriving();
                    if Instant::now() >= self.deadline {
                        return Ok(self.dead_reason());
                    }
                    // The statistics' view of how long the session was alive (`next_backoff_ms`),
                    // said with the duties rather than at every frame.
                    self.agent.shared.stats().on_heard(self.last_frame);
                    if let Some((reason, sent)) = self.unacknowledged() {
                        self.whole_until = Some(sent);
                        return Ok(reason);
                    }
                    if let Some(seq) = self.suspect.take()
                        && self.agent.outbox.held(tether_proto::Seq(seq)).is_some()
                    {
                        self.resend(Some(seq));
                    }
                    for duty in duties.take_due(Instant::now()) {
                        if let Err(reason) = self.duty(duty).await {
                            return Ok(reason);
                        }
                    }
                    armed = duties.next().min(self.deadline);
                    timer.as_mut().reset(armed);
                }
                // Let the tasks woken in the same round (this worker's other executors, whose
                // timers fired together) add theirs first: one frame carries them all, for one
                // scheduler round of delay and no timer.
                Ev::Ready => tokio::task::yield_now().await,
                Ev::Reply => {
                    for reply in replies.replies().take() {
                        if let Err(reason) = self.send(&reply).await {
                            return Ok(reason);
                        }
                    }
                }
                Ev::Wake => {}
            }
        }
    }

    /// Does one periodic duty; `Err(reason)` when the session is found lost.
    async fn duty(&mut self, duty: Duty) -> Result<(), String> {
        match duty {
            Duty::Heartbeat => self.heartbeat().await,
            Duty::Ping => {
                let ping = self.ws.send(Message::Ping(Default::default()));
                match while_draining(ping, &mut self.deadline, self.timeout, &self.written).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("ping: {e}")),
                    Err(_) => Err(self.dead_reason()),
                }
            }
            Duty::Telemetry => {
                self.push_telemetry();
                Ok(())
            }
            Duty::StatsLog => {
                let s = self.agent.handle().stats();
                tracing::info!(worker = %self.worker(), stability = s.stability, rtt_p50_ms = s.rtt_p50_ms, rtt_p95_ms = s.rtt_p95_ms, reconnects = s.reconnects, outbox = self.agent.outbox.len(), "connection statistics");
                Ok(())
            }
        }
    }

    /// When the pace lets the outbox send again, if it holds it back now.
    fn paced_until(&mut self) -> Option<Instant> {
        let p = self.agent.pace.as_mut()?;
        p.allowed(Instant::now())
            .is_none()
            .then(|| p.resume_at(SEND_BATCH))
    }

    /// Sends what the window has room for. The entries taken are marked sent for this session;
    /// those whose frame a write did not take (it failed, or stalled until the liveness
    /// deadline) are put back as unsent, since this session may go on (a frame read after the
    /// stall moves the deadline), and they would otherwise wait for the next one, outside the
    /// window that notices a message never acknowledged. `Err(reason)` when a write failed
    /// (the connection is broken) or a tagged frame was not written: the session ends.
    /// A stop that comes while a write waits (a slow link can hold one for many seconds) tells
    /// the tasks to stop at once (see [`through_stop`]); the frames not yet written then go
    /// back to the outbox, for the main loop to take the stop in (`worker_stopping`) first.
    async fn flush_outbox(&mut self) -> Result<(), String> {
        // A window that a coordinator never acknowledges stays closed only until the message
        // waiting longest has waited the liveness timeout: that ends the session
        // (`unacknowledged`), and the next one sends it again.
        let mut budget = self.window.limit.saturating_sub(self.window.bytes);
        if budget == 0 {
            return Ok(());
        }
        let mut most = SEND_BATCH;
        if let Some(p) = &mut self.agent.pace {
            let Some(a) = p.allowed(Instant::now()) else {
                return Ok(());
            };
            most = most.min(a.messages);
            budget = budget.min(a.bytes);
        }
        let taken = self.agent.outbox.take_unsent_within(most, budget);
        // Messages are counted as taken, bytes as written (a frame's text as the coordinator
        // decodes it, envelope and all).
        if let Some(p) = &mut self.agent.pace {
            p.took(taken.len(), Instant::now());
        }
        let sent_at = Instant::now();
        let read_at = self.ws.get_ref().bytes_read();
        // More waits than went (the window or the pace held it): what these deliver measures
        // the link, not how little there was to send (`link::ShownRate`). Once a batch.
        let backlogged = self.agent.outbox.has_unsent();
        // Frames to feed: their text and the entries they carry.
        let mut frames: Vec<(String, std::ops::Range<usize>)> = Vec::new();
        match self.batching {
            Some(limits) if taken.len() > 1 => {
                let max_messages = (limits.max_messages as usize).max(1);
                // INVARIANT: a batch of several messages stays under half the coordinator's
                // frame limit, so only a message alone can be too large for it.
                let max_bytes = (limits.max_bytes as usize).min(self.max_frame_out / 2);
                let mut batch = Batch::new();
                let mut first = 0;
                for (i, (_, msg, _)) in taken.iter().enumerate() {
                    if let Some(text) = batch.push_within(msg.as_ref(), max_bytes) {
                        frames.push((text, first..i));
                        first = i;
                    }
                    if batch.len() >= max_messages {
                        frames.push((batch.take(), first..i + 1));
                        first = i + 1;
                    }
                }
                if !batch.is_empty() {
                    frames.push((batch.take(), first..taken.len()));
                }
            }
            _ => {
                for (i, (_, msg, _)) in taken.iter().enumerate() {
                    frames.push((encode(msg.as_ref()), i..i + 1));
                }
            }
        }
        // Checkpoints one of whose pieces was dropped as too large: the coordinator is told,
        // so that it drops the upload at once instead of keeping it unfinished.
        let mut abandoned: Vec<(TaskId, CheckpointId)> = Vec::new();
        for (text, entries) in frames {
            if self.tasks_told && !self.draining {
                let unsent = taken[entries.start..].iter().map(|(seq, _, _)| *seq);
                self.agent.outbox.unsend(unsent);
                break;
            }
            if !frame_fits(text.len(), self.max_frame_out) {
                // Queued or journaled under a larger limit: sent, it would end this session
                // and every later one. A result fails its attempt instead, the rest is dropped.
                for (seq, msg, _) in &taken[entries] {
                    let outcome = self
                        .agent
                        .outbox
                        .too_large(*seq, text.len(), self.max_frame_out);
                    if let (Oversize::Dropped, WorkerMsg::CheckpointData(d)) =
                        (outcome, msg.as_ref())
                        && !abandoned.iter().any(|(_, id)| id == &d.checkpoint_id)
                    {
                        abandoned.push((d.task_id.clone(), d.checkpoint_id.clone()));
                    }
                }
                continue;
            }
            let text_len = text.len();
            let frame = self.frame_text(text);
            // A feed that did not complete did not take its frame: it waited for room in the
            // write buffer (`poll_ready`) until the deadline, or failed.
            let feed = self.ws.feed(frame);
            let write = while_draining(feed, &mut self.deadline, self.timeout, &self.written);
            let fed =
                through_stop(write, &self.stop, &self.agent.runner, &mut self.tasks_told).await;
            if let Err(reason) = write_result(fed) {
                let unsent = taken[entries.start..].iter().map(|(seq, _, _)| *seq);
                self.agent.outbox.unsend(unsent);
                // A tagged frame not written leaves a gap in the count the tags carry: every
                // later frame would fail its tag at the coordinator.
                return match is_liveness_timeout(&reason) && self.seal.is_none() {
                    true => Ok(()),
                    false => Err(reason),
                };
            }
            if let Some(p) = &mut self.agent.pace {
                p.wrote(text_len);
            }
            // Counted once its frame is written: not one dropped as too large, nor one whose
            // write failed (it is counted when a later write takes it).
            for (seq, msg, bytes) in &taken[entries] {
                count_out(msg);
                self.window.enter(Sent {
                    seq: seq.0,
                    bytes: *bytes,
                    at: sent_at,
                    delivered: 0,
                    read: read_at,
                    in_order: !matches!(msg.as_ref(), WorkerMsg::CheckpointFetch(_)),
                    backlogged,
                });
            }
        }
        for (task_id, checkpoint_id) in abandoned {
            let size = self.max_frame_out;
            let error = WorkerMsg::CheckpointError(CheckpointError {
                task_id,
                checkpoint_id: Some(checkpoint_id),
                error: format!(
                    "a piece of this checkpoint is larger than the coordinator's frames ({size} bytes); the upload is abandoned"
                ),
                timestamp: now(),
            });
            self.send(&error).await?;
        }
        // What was fed is in the window: a flush that stalls until the deadline (a slow link)
        // leaves it to the window's own watch and the liveness deadline.
        let flush = self.ws.flush();
        let write = while_draining(flush, &mut self.deadline, self.timeout, &self.written);
        match through_stop(write, &self.stop, &self.agent.runner, &mut self.tasks_told).await {
            Ok(Err(e)) => Err(format!("write: {e}")),
            _ => Ok(()),
        }
    }

    async fn heartbeat(&mut self) -> Result<(), String> {
        self.agent.heartbeat_seq += 1;
        let seq = self.agent.heartbeat_seq;
        if self.pending_heartbeats.len() == PENDING_HEARTBEATS {
            self.pending_heartbeats.pop_front();
        }
        self.pending_heartbeats.push_back(PendingBeat {
            seq,
            at: Instant::now(),
            read: self.ws.get_ref().bytes_read(),
            queued: self.window.bytes >= LOADED,
        });
        let mut active_tasks = self.agent.runner.active();
        let all = active_tasks.len();
        if fit_active_tasks(&mut active_tasks, self.max_frame_out) && !self.trimmed_heartbeat {
            self.trimmed_heartbeat = true;
            tracing::warn!(worker = %self.worker(), listed = active_tasks.len(), active = all, limit = self.max_frame_out, "heartbeats list only the attempts that fit the coordinator's frames");
        }
        let hb = WorkerMsg::Heartbeat(Heartbeat {
            sequence: seq,
            active_tasks,
            timestamp: now(),
        });
        self.send(&hb).await
    }

    fn push_telemetry(&self) {
        let stats = self.agent.handle().stats();
        // What the coordinator will show, for the early report's comparison.
        self.agent.shared.stats().on_reported(&stats);
        let metrics: serde_json::Map<String, serde_json::Value> = self
            .agent
            .runner
            .executors()
            .metrics()
            .into_iter()
            .map(|(k, m)| {
                (
                    k,
                    serde_json::json!({
                        "executions": m.executions.load(Ordering::Relaxed),
                        "completed": m.completed.load(Ordering::Relaxed),
                        "failed": m.failed.load(Ordering::Relaxed),
                        "resumed_from_checkpoint": m.resumed_from_checkpoint.load(Ordering::Relaxed),
                    }),
                )
            })
            .collect();
        let outbox_len = self.agent.outbox.len();
        self.agent
            .outbox
            .push(Class::Telemetry, Some(Coalesce::Telemetry), |seq| {
                WorkerMsg::Telemetry(Telemetry {
                    seq,
                    connection_stats: stats,
                    metrics: serde_json::json!({ "executors": metrics, "outbox": outbox_len })
                        .into(),
                    timestamp: now(),
                })
            });
    }

    /// How many times the coordinator's welcome interval a budget asked for, if one did.
    fn stretch(&self) -> Option<f64> {
        (self.budget && !self.coordinator_every.is_zero())
            .then(|| self.heartbeat_every.as_secs_f64() / self.coordinator_every.as_secs_f64())
    }

    /// The coordinator asked for a new interval (its fleet grew or shrank). Beyond its
    /// welcome's it is a budget's, followed as asked (within [`followed_interval`]'s bounds),
    /// with its timeout as this session's least (within [`followed_timeout`]'s); otherwise, as
    /// in the welcome, this worker's own interval when that is shorter.
    fn retune(&mut self, interval_ms: u64, timeout_ms: Option<u64>) {
        let Some(asked) = followed_interval(interval_ms) else {
            return;
        };
        let budget = asked > self.coordinator_every;
        self.budget = budget;
        self.retuned = true;
        let every = if budget {
            asked
        } else {
            asked.min(self.agent.cfg.heartbeat_interval)
        };
        self.timeout_floor = match budget {
            true => followed_timeout(timeout_ms, every),
            false => Duration::ZERO,
        };
        if every != self.heartbeat_every {
            tracing::info!(worker = %self.worker(), from_ms = self.heartbeat_every.as_millis() as u64, to_ms = every.as_millis() as u64, "heartbeat interval retuned by the coordinator");
        }
        self.heartbeat_every = every;
        self.agent
            .shared
            .heartbeat_interval_ms
            .store(every.as_millis() as u64, Ordering::Relaxed);
        let p95 = self.agent.shared.stats().rtt_percentile(95.0);
        self.retime(p95);
    }

    /// Publishes the link's delivery rate when an acknowledgement moved it: checkpoints
    /// written from now on are cut into pieces of about a second of it, and the next session's
    /// window starts from it. The stats show the rate measured while the worker had more to
    /// send than went at once ([`link::ShownRate`]).
    fn publish_rate(&mut self) {
        // One reading of the clock for both (this runs at every acknowledgement).
        let now = Instant::now();
        if let Some(shown) = self.window.shown_moved(now) {
            self.agent
                .shared
                .send_bytes_per_sec
                .store(shown as u64, Ordering::Relaxed);
        }
        let Some(rate) = self.window.rate_moved(now) else {
            return;
        };
        self.agent
            .shared
            .link_bytes_per_sec
            .store(rate as u64, Ordering::Relaxed);
        self.agent.runner.size_pieces_for(rate);
    }

    fn on_rtt(&mut self, response_to: Option<u64>) {
        let Some(seq) = response_to else { return };
        let Some(pos) = self.pending_heartbeats.iter().position(|b| b.seq == seq) else {
            return;
        };
        let Some(beat) = self.pending_heartbeats.remove(pos) else {
            return;
        };
        let rtt = beat.at.elapsed();
        m::observe(m::HEARTBEAT_RTT, rtt);
        self.agent
            .shared
            .heartbeats_answered
            .fetch_add(1, Ordering::Relaxed);
        let arrived = self.ws.get_ref().bytes_read().saturating_sub(beat.read);
        if beat.queued || arrived > LOADED as u64 {
            metrics::counter!(m::HEARTBEAT_RTT_LOADED).increment(1);
            return;
        }
        let (p50, p95, stale) = {
            let mut s = self.agent.shared.stats();
            s.on_rtt(rtt);
            s.on_heard(self.last_frame);
            (
                s.rtt_percentile(50.0),
                s.rtt_percentile(95.0),
                s.report_stale(),
            )
        };
        if let Some(ms) = p50 {
            self.window.rtt = Duration::from_secs_f64(ms / 1e3);
        }
        self.retime(p95);
        if stale {
            self.report_soon();
        }
    }

    /// Brings the telemetry duty forward: the RTT the coordinator shows is far from this
    /// session's (a latency fault, another path), and would stay so until the next report, a
    /// telemetry interval (30 s) on. At a random point of the next heartbeat period (of
    /// [`EARLY_REPORT_GAP`] at most): a change every worker sees at once (the coordinator's
    /// own latency) has the fleet's reports spread over a period beyond their heartbeats'
    /// phases, and the report moves the periodic one rather than adding to it.
    ///
    /// [`EARLY_REPORT_GAP`]: crate::stats::EARLY_REPORT_GAP
    fn report_soon(&mut self) {
        use rand::Rng;
        let spread = self
            .heartbeat_every
            .min(crate::stats::EARLY_REPORT_GAP)
            .mul_f64(self.agent.rng.random::<f64>());
        let at = Instant::now() + spread;
        self.report_by = Some(self.report_by.map_or(at, |by| by.min(at)));
        self.retuned = true;
    }

    /// The session's timeout for the recent p95 RTT (ms), its interval and the coordinator's
    /// floor.
    fn retime(&mut self, p95: Option<f64>) {
        let cfg = &self.agent.cfg;
        self.timeout = adaptive::heartbeat_timeout(
            &cfg.adaptive,
            cfg.heartbeat_timeout,
            self.heartbeat_every,
            p95.map(|ms| Duration::from_secs_f64(ms / 1e3)),
        )
        .max(self.timeout_floor);
        // The new timeout counts from the last frame, this one: a shorter one brings the
        // deadline forward at once, a longer one puts it back.
        self.deadline = self.last_frame + self.timeout;
        self.agent
            .shared
            .heartbeat_timeout_ms
            .store(self.timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// An acknowledgement: the entry leaves the outbox; a result ack goes to the event log;
    /// the ack hook sees it with the message it acknowledged.
    fn on_ack(&mut self, ack: &tether_proto::msg::Ack, result: bool) {
        self.window.leave(ack.ack_seq.0);
        self.publish_rate();
        if ack.disposition == tether_proto::msg::Disposition::Rejected {
            tracing::warn!(worker = %self.worker(), seq = %ack.ack_seq, task = ?ack.task_id, "coordinator rejected a message; it will not be resent");
        }
        // A result leaves only on its own ack, a fetch only on its piece or an error: an ack of
        // another kind naming one (a confused coordinator, a forged frame on a session without
        // tags) would drop a result undelivered, or leave a fetch waiting for ever.
        let misnamed = |m: &WorkerMsg| match m {
            WorkerMsg::TaskResult(_) => !result,
            WorkerMsg::CheckpointFetch(_) => true,
            _ => false,
        };
        let agent = &*self.agent;
        let acked = take_witnessed(&agent.outbox, ack, result, misnamed, |e| agent.event(e));
        // A checkpoint whose announcement was refused: its pieces would be refused one by one.
        if ack.disposition == tether_proto::msg::Disposition::Rejected
            && let Some(WorkerMsg::Checkpoint(c)) = acked.as_deref()
        {
            let dropped =
                self.agent
                    .outbox
                    .drop_checkpoint_pieces(&c.task_id, &c.checkpoint_id, ack.ack_seq);
            tracing::warn!(worker = %self.worker(), task = %c.task_id, checkpoint = %c.checkpoint_id, dropped, "checkpoint refused by the coordinator; its pieces are not sent");
        }
        if result && ack.disposition == tether_proto::msg::Disposition::Stale {
            self.stale(ack, acked.as_deref());
        }
        self.acked(ack, acked.as_deref());
    }

    /// The coordinator's word on whether an operator drained this worker (each heartbeat
    /// reply's `draining`): said once at each change, at INFO, kept for the metrics.
    fn drained(&self, drained: bool) {
        if self.agent.shared.drained.swap(drained, Ordering::Relaxed) == drained {
            return;
        }
        self.agent
            .event(crate::eventlog::Event::Drained { draining: drained });
        match drained {
            true => {
                tracing::info!(worker = %self.worker(), "drained by an operator (tether drain): the coordinator sends no new task until `tether undrain`; what this worker runs goes on");
            }
            false => {
                tracing::info!(worker = %self.worker(), "undrained: the coordinator sends tasks again");
            }
        }
    }

    /// A result acknowledged `stale`: kept by the coordinator, never counted. Said at WARN, as
    /// it is work done for nothing (the task runs again elsewhere, or here as a later attempt),
    /// and counted.
    fn stale(&self, ack: &tether_proto::msg::Ack, held: Option<&WorkerMsg>) {
        // A cancel's end is answered `stale` too (the coordinator counts it apart): no waste.
        if let Some(WorkerMsg::TaskResult(r)) = held
            && r.outcome == tether_proto::Outcome::Cancelled
        {
            tracing::debug!(worker = %self.worker(), task = %r.task_id, attempt = %r.attempt, "the result of a cancelled attempt is kept, not counted");
            return;
        }
        metrics::counter!(m::STALE_RESULTS).increment(1);
        // The coordinator says why (how the attempt ended); one that does not, the usual why.
        let why = match ack.reason.as_deref() {
            Some(reason) => format!("{:?}", tether_proto::msg::logged(reason)),
            None => STALE_WHY.to_owned(),
        };
        match held {
            Some(WorkerMsg::TaskResult(r)) => {
                tracing::warn!(worker = %self.worker(), task = %r.task_id, attempt = %r.attempt, outcome = ?r.outcome, seq = %ack.ack_seq, "result kept by the coordinator but not counted (stale): {why}");
            }
            _ => {
                tracing::warn!(worker = %self.worker(), task = ?ack.task_id, seq = %ack.ack_seq, "result kept by the coordinator but not counted (stale): {why}");
            }
        }
    }

    /// Sends again what the coordinator dropped as damaged: message `seq`, or everything in
    /// flight. At most once a liveness timeout; later ones wait for the ack deadline.
    fn resend(&mut self, seq: Option<u64>) {
        let now = Instant::now();
        if self.resent_at.is_some_and(|at| now < at + self.timeout) {
            tracing::debug!(worker = %self.worker(), "another bad_frame: left to the ack deadline");
            return;
        }
        let seqs = self.window.forget(seq);
        if seqs.is_empty() {
            return;
        }
        self.resent_at = Some(now);
        tracing::warn!(worker = %self.worker(), resent = seqs.len(), first = seqs[0], "the coordinator dropped a frame of this worker as damaged in transit (bad_frame): sending again what it has not acknowledged");
        self.agent
            .outbox
            .unsend(seqs.into_iter().map(tether_proto::Seq));
    }

    /// What follows an ack of a message (`held` if the outbox still held it), once it left
    /// the outbox.
    fn acked(&mut self, ack: &tether_proto::msg::Ack, held: Option<&WorkerMsg>) {
        // What the coordinator holds of a checkpoint decides whether a stop may forget it.
        if let Some(msg) = held {
            self.agent.runner.acknowledged(msg, ack.disposition);
        }
        if let Some(hook) = &self.agent.ack_hook {
            hook(ack, held);
        }
    }

    /// Each sequence number in `acks` is acknowledged as a `*_ack` with disposition `recorded`
    /// would be. One that covers more than [`tether_proto::msg::MAX_ACKS_COVERED`] or holds an
    /// inverted range is refused whole and counted.
    fn on_acks(&mut self, acks: &tether_proto::msg::Acks) {
        let Some(seqs) = acks.seqs() else {
            self.agent.shared.bad_frames.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(worker = %self.worker(), ranges = acks.recorded.len(), "acks with an inverted range or covering too many messages; ignored");
            return;
        };
        for seq in &seqs {
            self.window.leave(seq.0);
        }
        self.publish_rate();
        // All of them leave the outbox together (one lock, one journal write). A result or a
        // fetch never does: `acks` acknowledges neither (a result's ack says how it was
        // recorded, a fetch is answered by its piece), and one named here stays held, to be
        // sent again, rather than be dropped undelivered or left waiting for ever.
        let result =
            |m: &WorkerMsg| matches!(m, WorkerMsg::TaskResult(_) | WorkerMsg::CheckpointFetch(_));
        let mut held = self
            .agent
            .outbox
            .take_acked_but(seqs.iter().copied(), result)
            .into_iter()
            .peekable();
        for seq in seqs {
            let msg = held.next_if(|(s, _)| *s == seq).map(|(_, m)| m);
            let ack = tether_proto::msg::Ack {
                ack_seq: seq,
                task_id: None,
                checkpoint_id: None,
                chunk: None,
                disposition: tether_proto::msg::Disposition::Recorded,
                reason: None,
                timestamp: acks.timestamp,
            };
            // No result leaves the outbox here (`result` above), so none has an ack to witness
            // in the event log first (`take_witnessed`).
            self.acked(&ack, msg.as_deref());
        }
    }

    async fn handle(&mut self, msg: CoordMsg) -> Result<(), String> {
        let runner = self.agent.runner.clone();
        let outbox = self.agent.outbox.clone();
        match msg {
            CoordMsg::Heartbeat(h) => {
                if let Some(ms) = h.heartbeat_interval_ms {
                    self.retune(ms, h.heartbeat_timeout_ms);
                }
                self.drained(h.draining);
                self.on_rtt(h.response_to);
                for action in h.actions {
                    match action {
                        HeartbeatAction::SyncState => {
                            outbox.requeue_all();
                            runner.state_request(&tether_proto::msg::StateRequest {
                                task_id: None,
                                timestamp: now(),
                            });
                        }
                        HeartbeatAction::ResetConnectionStats => self.agent.shared.stats().reset(),
                    }
                }
            }
            CoordMsg::TaskAssignment(a) if self.draining => {
                tracing::info!(worker = %self.worker(), task = %a.task_id, attempt = %a.attempt, "stopping: an assignment not taken (sent before the coordinator read worker_stopping; it moves with worker_stopped)");
            }
            CoordMsg::TaskAssignment(a) => {
                tracing::info!(worker = %self.worker(), task = %a.task_id, attempt = %a.attempt, kind = %a.kind, resume = a.checkpoint.is_some(), "task assigned");
                runner.assign(a);
            }
            CoordMsg::TaskResultAck(ack) => self.on_ack(&ack, true),
            CoordMsg::TaskStateAck(ack)
            | CoordMsg::CheckpointAck(ack)
            | CoordMsg::CheckpointDataAck(ack)
            | CoordMsg::TaskCancelledAck(ack)
            | CoordMsg::TaskPausedAck(ack)
            | CoordMsg::TaskResumedAck(ack)
            | CoordMsg::TelemetryAck(ack) => self.on_ack(&ack, false),
            CoordMsg::Acks(acks) => self.on_acks(&acks),
            CoordMsg::CheckpointRequest(req) => {
                // Never waits for room in the outbox: only this task reads the acks that make it.
                if let Some(reply) = runner.checkpoint_request(&req) {
                    self.send(&reply).await?;
                }
            }
            CoordMsg::CheckpointPiece(piece) => {
                // The piece acknowledges its fetch, and nothing else its `ack_seq` might name
                // (a result would be dropped undelivered).
                match outbox.held(piece.ack_seq).as_deref() {
                    Some(WorkerMsg::CheckpointFetch(f)) if f.task_id == piece.task_id => {
                        let read = self.ws.get_ref().bytes_read();
                        if let Some(rate) = self.window.fetched(piece.ack_seq.0, read) {
                            runner.size_fetches_for(rate);
                        }
                        outbox.ack(piece.ack_seq);
                    }
                    Some(other) => {
                        tracing::warn!(worker = %self.worker(), seq = %piece.ack_seq, held = other.type_name(), "a checkpoint piece names an entry that is not its fetch; it acknowledges nothing");
                        return Ok(());
                    }
                    // Answered already (a fetch sent twice is answered twice).
                    None => {}
                }
                runner.checkpoint_piece(piece);
            }
            CoordMsg::StateRequest(req) => {
                if let Some(reply) = runner.state_request(&req) {
                    self.send(&reply).await?;
                }
            }
            CoordMsg::CancelTask(c) => runner.cancel(&c),
            CoordMsg::PauseTask(c) => runner.pause(&c),
            CoordMsg::ResumeTask(c) => runner.resume(&c),
            CoordMsg::Error(e) => {
                metrics::counter!(m::ERRORS, "code" => e.code.as_str(), "direction" => "received")
                    .increment(1);
                self.agent
                    .shared
                    .errors_received
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(worker = %self.worker(), code = e.code.as_str(), message = ?e.logged(), offending = ?e.offending_type, "coordinator reported an error");
                // A fetch the coordinator cannot read (one that does not know `checkpoint_fetch`:
                // say a rollback while it was under way) is answered by no piece, ever: it ends,
                // and its attempt starts afresh. (Slowed down, it is sent again.)
                // It ends that fetch, and nothing else its `ref_seq` might name (a result would
                // be dropped undelivered), as a piece does.
                let unreadable = matches!(e.code, ErrorCode::UnknownType | ErrorCode::BadFrame);
                if let (true, Some("checkpoint_fetch"), Some(seq)) =
                    (unreadable, e.offending_type.as_deref(), e.ref_seq)
                    && let Some(held) = outbox.held(tether_proto::Seq(seq))
                {
                    let WorkerMsg::CheckpointFetch(f) = held.as_ref() else {
                        tracing::warn!(worker = %self.worker(), seq, held = held.type_name(), "an error names as a checkpoint_fetch an entry that is not one; it ends nothing");
                        return Ok(());
                    };
                    outbox.ack(f.seq);
                    self.window.leave(seq);
                    runner.checkpoint_piece(tether_proto::msg::CheckpointPiece {
                        ack_seq: f.seq,
                        task_id: f.task_id.clone(),
                        checkpoint_id: f.checkpoint_id.clone(),
                        offset: f.offset,
                        data: None,
                        error: Some(format!("the coordinator refused the fetch: {}", e.message)),
                        code: Some(e.code),
                        timestamp: now(),
                    });
                }
                // A frame of ours arrived damaged (a corrupting link): the coordinator dropped
                // it, and its ack will never come. Sent again now rather than after the ack
                // deadline (a liveness timeout of waiting, then a new session): the coordinator
                // keeps one of each message (as a `sync_state` resend relies on), so what was
                // read after all is answered `duplicate`. One it could not read a `seq` of: all
                // in flight, it may have been any (or a batch of them). One whose `seq` it read
                // was read whole, and is refused by an ack that follows (a checkpoint too
                // large, say) unless damaged: sent again only if still unanswered at the next
                // tick. A fetch's error was handled above.
                if e.code == ErrorCode::BadFrame
                    && e.offending_type.as_deref() != Some("checkpoint_fetch")
                {
                    match e.ref_seq {
                        None => self.resend(None),
                        Some(seq) => self.suspect = Some(seq),
                    }
                }
                // A frame of ours failed its tag there: it is lost, and so is every later one
                // (tags count frames, and the coordinator's count stays at the lost frame's
                // number). Not kept: no resend in this session can verify (the lost frame's
                // number is spent here and `bad_mac` does not say which it was), the heartbeats
                // would fail too until the third failure closes the session (1008), and a
                // coordinator that counts only verified frames as the worker alive would
                // meanwhile see it silent. A new session replays the outbox under a fresh key.
                if e.code == ErrorCode::BadMac {
                    return Err(format!("coordinator dropped a frame: {}", e.message));
                }
            }
            CoordMsg::Welcome(_) | CoordMsg::RegistrationAck(_) => {
                tracing::debug!(worker = %self.worker(), "late welcome or registration_ack ignored");
            }
        }
        Ok(())
    }
}

/// The send window: outbox entries sent in this session and not acknowledged yet, in sequence
/// order, and their bytes. A sorted queue rather than a map: entries are mostly sent and
/// acknowledged in sequence order, so the work is at its ends (a map's insert and remove, cold
/// in a fleet of a thousand sessions, were 2.5 % of the stress fleet's CPU).
#[derive(Debug)]
struct Window {
    sent: VecDeque<Sent>,
    bytes: usize,
    /// Bytes acknowledged in this session.
    delivered: u64,
    /// The link's rate, from the acknowledgements.
    rate: link::DeliveryRate,
    /// The most estimated bytes sent and not yet acknowledged: a round trip and about a
    /// second of the link ([`link::window_for`]). Bounds how long a result or a heartbeat
    /// sits behind a large upload on a slow link, so that a big checkpoint never starves the
    /// session.
    limit: usize,
    /// The path's round trip, the heartbeats' p50 (zero before one is answered): what the
    /// window holds in flight beside its queue.
    rtt: Duration,
    /// The shortest wait of a small message ([`SMALL_ACKED`]) for its acknowledgement in
    /// this session: the round trip where no heartbeat measured one (each sent behind a window
    /// in flight is left out, and an upload from the registration on leaves none).
    min_ack: Option<Duration>,
    /// The rate last published ([`Window::rate_moved`]).
    published: Option<f64>,
    /// The rate the statistics show, from the samples of messages sent with more waiting.
    shown: link::ShownRate,
    /// The shown rate last published ([`Window::shown_moved`]).
    shown_published: Option<f64>,
    /// The rate the link delivers to this worker, from the checkpoint pieces that answer its
    /// fetches: the bytes read while a fetch was on its way.
    down: link::DeliveryRate,
    /// Entries wait for the window to open ([`Window::held_back`]).
    full: bool,
    /// When an acknowledgement last took an entry out.
    last_ack: Option<Instant>,
    /// The latest send time among the in-order entries acknowledged.
    newest_acked: Option<Instant>,
    /// When the coordinator last showed that it reads what was sent (its ping while a frame of
    /// ours arrives) or that its answers wait behind a frame of its own (one arriving).
    heard: Option<Instant>,
}

/// The largest message whose wait for its acknowledgement is taken for a round trip
/// ([`Window::min_ack`]): a larger one's includes its own time on a slow link (a second for a
/// piece of a second of it).
const SMALL_ACKED: usize = 2048;

/// A heartbeat sent and not yet answered.
#[derive(Debug, Clone, Copy)]
struct PendingBeat {
    seq: u64,
    at: Instant,
    /// The connection's count of bytes read when it was sent.
    read: u64,
    /// Its round trip measures a queue, not the path: sent while [`LOADED`] bytes or more of
    /// ours waited for acknowledgement, or still unanswered when the coordinator pinged (it
    /// pings while its answers wait: its core held up, a frame of ours still arriving).
    queued: bool,
}

/// An entry of the [`Window`].
#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u64,
    bytes: usize,
    at: Instant,
    /// [`Window::delivered`] when it was sent (set by [`Window::enter`]).
    delivered: u64,
    /// The connection's count of bytes read when it was sent.
    read: u64,
    /// Answered in the order the coordinator handles the session's messages: everything but a
    /// `checkpoint_fetch`, whose `checkpoint_piece` is read from the store apart from the
    /// commits that acknowledge the rest, and may come before or after them.
    in_order: bool,
    /// Sent while more waited in the outbox: its sample counts for the rate shown.
    backlogged: bool,
}

impl Default for Window {
    fn default() -> Self {
        Self::measured(None)
    }
}

impl Window {
    /// A window for a link last measured at `rate` bytes a second (the last session's
    /// measure: a reconnect over a slow link does not start with a whole window at once).
    fn measured(rate: Option<f64>) -> Self {
        Self {
            sent: VecDeque::new(),
            bytes: 0,
            delivered: 0,
            rate: link::DeliveryRate::default(),
            limit: link::window_for(rate, Duration::ZERO),
            rtt: Duration::ZERO,
            min_ack: None,
            published: None,
            shown: link::ShownRate::default(),
            shown_published: None,
            down: link::DeliveryRate::default(),
            full: false,
            last_ack: None,
            newest_acked: None,
            heard: None,
        }
    }

    /// A sent message takes room until acknowledged. Sent again in the same session (a
    /// `sync_state` directive resends the outbox), it counts once.
    fn enter(&mut self, mut e: Sent) {
        e.delivered = self.delivered;
        let w = &mut self.sent;
        match w.back() {
            Some(last) if last.seq >= e.seq => {
                let i = w.partition_point(|s| s.seq < e.seq);
                match w.get_mut(i) {
                    Some(old) if old.seq == e.seq => {
                        self.bytes -= old.bytes;
                        *old = e;
                    }
                    _ => w.insert(i, e),
                }
            }
            _ => w.push_back(e),
        }
        self.bytes += e.bytes;
    }

    /// Whether entries wait for the window now (`waiting`: more to send, not held by the pace,
    /// and the window full) when they did not before: the start of a wait, counted once.
    fn held_back(&mut self, waiting: bool) -> bool {
        let started = waiting && !self.full;
        self.full = waiting;
        started
    }

    /// Takes message `seq` (or every message) out of the window unacknowledged, to be sent
    /// again: no sample of the link's rate. Returns their sequence numbers, in order.
    fn forget(&mut self, seq: Option<u64>) -> Vec<u64> {
        let (keep, gone): (VecDeque<Sent>, VecDeque<Sent>) = std::mem::take(&mut self.sent)
            .into_iter()
            .partition(|s| seq.is_some_and(|q| q != s.seq));
        self.sent = keep;
        self.bytes -= gone.iter().map(|s| s.bytes).sum::<usize>();
        gone.into_iter().map(|s| s.seq).collect()
    }

    /// The acknowledged message no longer takes room.
    fn leave(&mut self, seq: u64) {
        if let Ok(i) = self.sent.binary_search_by_key(&seq, |s| s.seq)
            && let Some(e) = self.sent.remove(i)
        {
            let now = Instant::now();
            self.bytes -= e.bytes;
            self.last_ack = Some(now);
            if e.in_order {
                self.newest_acked = self.newest_acked.max(Some(e.at));
            }
            // What the link delivered while this message was on its way.
            self.delivered += e.bytes as u64;
            let delivered = self.delivered - e.delivered;
            let waited = now - e.at;
            self.rate.sample(delivered, waited, now);
            self.shown.sample(delivered, waited, now, e.backlogged);
            if e.bytes <= SMALL_ACKED {
                self.min_ack = Some(self.min_ack.map_or(waited, |m| m.min(waited)));
            }
            // The heartbeats' round trip, or the acknowledgements' where it is shorter (none
            // measured, or measured before the path slowed).
            let rtt = self.rtt.max(self.min_ack.unwrap_or_default());
            self.limit = link::window_for(self.rate.estimate(now), rtt);
        }
    }

    /// The piece answering fetch `seq` arrived, the connection's count of bytes read at `read`:
    /// a sample of the rate the link delivers to this worker, which is returned; then the fetch
    /// leaves the window.
    fn fetched(&mut self, seq: u64, read: u64) -> Option<f64> {
        let now = Instant::now();
        if let Ok(i) = self.sent.binary_search_by_key(&seq, |s| s.seq) {
            let e = self.sent[i];
            self.down
                .sample(read.saturating_sub(e.read), now - e.at, now);
        }
        self.leave(seq);
        self.down.estimate(now)
    }

    /// The rate to show when it moved since last asked (and was published).
    fn shown_moved(&mut self, now: Instant) -> Option<f64> {
        let shown = self.shown.estimate(now);
        if shown == self.shown_published {
            return None;
        }
        self.shown_published = shown;
        shown
    }

    /// The link's rate when it moved since last asked (and was published).
    fn rate_moved(&mut self, now: Instant) -> Option<f64> {
        let rate = self.rate.estimate(now);
        if rate == self.published {
            return None;
        }
        self.published = rate;
        rate
    }

    /// The message the link lost, if one is known lost: waiting `timeout` for its
    /// acknowledgement while either nothing at all was acknowledged for as long, or (for one
    /// answered in order) a message sent after it was (the coordinator handles a session's
    /// messages in order). A slow link whose acknowledgements still trickle in, in order,
    /// loses nothing by this reading, nor does a fetch whose piece takes longer than the
    /// acknowledgements of what was sent after it, nor a link so slow that nothing is
    /// acknowledged for a while but the coordinator was [`Window::heard`] within `timeout`.
    fn lost(&self, timeout: Duration) -> Option<(u64, Instant)> {
        let quiet = |t: Option<Instant>| t.is_none_or(|t| t.elapsed() >= timeout);
        let silent = quiet(self.last_ack) && quiet(self.heard);
        let waited = |e: &&Sent| e.at.elapsed() >= timeout;
        let lost = match silent {
            true => self.sent.iter().filter(waited).min_by_key(|e| e.at),
            false => self
                .sent
                .iter()
                .filter(|e| e.in_order && self.newest_acked.is_some_and(|n| n > e.at))
                .filter(waited)
                .min_by_key(|e| e.at),
        };
        lost.map(|e| (e.seq, e.at))
    }

    /// The coordinator showed at `at` that the link carries what was sent, or that its answers
    /// wait behind a frame arriving: nothing is taken as lost for a timeout from then.
    fn heard(&mut self, at: Instant) {
        self.heard = self.heard.max(Some(at));
    }

    /// The message waiting longest for its acknowledgement: its sequence number and send time.
    #[cfg(test)]
    fn oldest(&self) -> Option<(u64, Instant)> {
        self.sent.iter().min_by_key(|e| e.at).map(|e| (e.seq, e.at))
    }
}

/// Cuts a heartbeat's `active_tasks` to what fits a frame of `limit` bytes; whether it cut.
/// The coordinator does not read the list (docs/PROTOCOL.md, section 4): a heartbeat that
/// lists fewer attempts still keeps the session alive, where one too large would end it (close
/// 1009) at every beat.
fn fit_active_tasks(tasks: &mut Vec<tether_proto::task::TaskRef>, limit: usize) -> bool {
    // The heartbeat around the list, generously (its sequence and timestamp).
    const REST: usize = 128;
    // A task ref's JSON at most: an id of `MAX_ID_LEN` (no character needs escaping), an
    // attempt, the keys and a comma.
    const MOST_PER_TASK: usize = tether_proto::ids::MAX_ID_LEN + 64;
    let room = limit.saturating_sub(tether_proto::integrity::TEXT_TRAILER + REST);
    if tasks.len().saturating_mul(MOST_PER_TASK) <= room {
        return false;
    }
    let mut used = 0;
    let fit = tasks
        .iter()
        .take_while(|t| {
            used += serde_json::to_string(t).map_or(usize::MAX / 2, |j| j.len() + 1);
            used <= room
        })
        .count();
    let cut = fit < tasks.len();
    tasks.truncate(fit);
    cut
}

/// Below this many messages a second a coordinator's rate holds back a worker's heartbeats
/// and results, not only its floods: warned about, then followed.
const SLOW_MESSAGE_RATE: f64 = 1.0;
/// Below this many bytes a second, likewise (a registration alone is about 1 KiB).
const SLOW_BYTE_RATE: f64 = 1024.0;

/// What is odd in a coordinator's `registration_ack`, each said as what the worker does with
/// it: a limit it cannot follow as given (raised, or ignored), or one that will starve it. A
/// coordinator's values are never refused (they are its own limits, which it enforces); these
/// are warned about once, so that a misconfigured coordinator is found from the worker's log.
fn odd_in_ack(ack: &RegistrationAck) -> Vec<String> {
    let mut odd = Vec::new();
    if let Some(n) = ack.max_frame.filter(|&n| n < MIN_FRAME as u64) {
        odd.push(format!(
            "max_frame {n} bytes is under the least any frame needs ({MIN_FRAME}); frames of up to {MIN_FRAME} bytes are sent, which it may refuse"
        ));
    }
    if ack.max_checkpoint == Some(0) {
        odd.push(
            "max_checkpoint 0: it keeps no checkpoint, so none is uploaded and a task moved to another worker restarts from the beginning".into(),
        );
    }
    for (name, rate, slow, unit) in [
        (
            "message_rate",
            ack.message_rate,
            SLOW_MESSAGE_RATE,
            "messages",
        ),
        ("byte_rate", ack.byte_rate, SLOW_BYTE_RATE, "bytes"),
    ] {
        let Some(r) = rate else { continue };
        if !(r.per_sec.is_finite() && r.per_sec > 0.0) {
            odd.push(format!(
                "{name} of {} {unit} a second is no rate; it is ignored (this worker is not paced by it)",
                r.per_sec
            ));
        } else if r.per_sec < slow {
            odd.push(format!(
                "{name} of {} {unit} a second is under {slow}: heartbeats and results wait for it, and the coordinator may take this worker for lost",
                r.per_sec
            ));
        }
    }
    if let Some(b) = ack.batching
        && (b.max_messages < 2 || b.max_bytes < MIN_FRAME as u64)
    {
        odd.push(format!(
            "batching of at most {} messages in {} bytes leaves little to batch; frames go one message at a time",
            b.max_messages, b.max_bytes
        ));
    }
    odd
}

/// The largest frame the coordinator takes: what its `registration_ack` announced, else
/// `own` (as before any coordinator said), never under [`MIN_FRAME`] (a coordinator refuses
/// a worker's smaller limit, and every message of the outbox can be made to fit in it).
fn peer_max_frame(announced: Option<u64>, own: usize) -> usize {
    announced
        .map_or(own, |n| usize::try_from(n).unwrap_or(usize::MAX))
        .max(MIN_FRAME)
}

fn write_result(
    r: Result<Result<(), tokio_tungstenite::tungstenite::Error>, tokio::time::error::Elapsed>,
) -> Result<(), String> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write: {e}")),
        Err(_) => Err(format!("write stalled: {DEAD}")),
    }
}

/// Counts a message written to the coordinator, and an `error` by its code.
fn count_out(msg: &WorkerMsg) {
    m::MESSAGES_OUT_BY_TYPE.increment(msg.type_name());
    if let WorkerMsg::Error(e) = msg {
        metrics::counter!(m::ERRORS, "code" => e.code.as_str(), "direction" => "sent").increment(1);
    }
}

/// Takes the message `ack` acknowledges out of the outbox (unless `kept` says it stays held),
/// after `witness` saw the event-log record of a result's ack. In that order: with a state
/// directory the outbox writes the removal through to its journal at once, and a worker killed
/// between the two would lose the line that shows the result acknowledged (the end-to-end
/// verdict `no_result_lost` reads it), while the other way round a restarted worker sends
/// the result again and the coordinator acks it `duplicate`, which is harmless.
fn take_witnessed(
    outbox: &crate::outbox::Outbox,
    ack: &tether_proto::msg::Ack,
    result: bool,
    kept: impl Fn(&WorkerMsg) -> bool,
    witness: impl FnOnce(crate::eventlog::Event),
) -> Option<std::sync::Arc<WorkerMsg>> {
    let held = outbox.held(ack.ack_seq).filter(|m| !kept(m));
    if let Some(event) = result_ack_event(ack, held.as_deref(), result) {
        witness(event);
    }
    outbox
        .take_acked_but([ack.ack_seq], kept)
        .pop()
        .map(|(_, m)| m)
}

/// The event-log record of `ack` if it acknowledges a result: `result` (a `task_result_ack`),
/// or `held`, the message acknowledged if the outbox still holds it, is one.
fn result_ack_event(
    ack: &tether_proto::msg::Ack,
    held: Option<&WorkerMsg>,
    result: bool,
) -> Option<crate::eventlog::Event> {
    let held_result = match held {
        Some(WorkerMsg::TaskResult(r)) => Some((&r.task_id, r.attempt)),
        _ => None,
    };
    // A result's ack names its task (the message held says its attempt).
    let task_id = ack
        .task_id
        .as_ref()
        .filter(|_| result)
        .or(held_result.map(|(t, _)| t))?;
    Some(crate::eventlog::Event::ResultAck {
        task_id: task_id.clone(),
        attempt: held_result.map(|(_, a)| a),
        seq: ack.ack_seq,
        disposition: ack.disposition,
    })
}

/// Why a result is `stale` when its ack does not say (a coordinator from before acks had a
/// `reason`): the one way it comes about with a worker that did not cancel it.
const STALE_WHY: &str = "its attempt no longer holds the task's lease: the coordinator declared this worker lost (away past its grace, --lost-after) or moved the task on, and runs it as another attempt";

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{Arc, Mutex};
    use tether_proto::Seq;

    /// The order in which the event log and the outbox's journal were written.
    struct Order(Arc<Mutex<Vec<&'static str>>>);

    impl crate::outbox::Journal for Order {
        fn write(
            &self,
            _: Option<crate::outbox::Put<'_>>,
            removed: &[Seq],
        ) -> Result<(), crate::outbox::JournalError> {
            if !removed.is_empty() {
                self.0.lock().expect("lock").push("journal: removed");
            }
            Ok(())
        }
    }

    /// A result's ack is in the event log before the result leaves the journal: a kill between
    /// the two then costs a result sent again (acked `duplicate`), never the line that shows it
    /// acknowledged.
    #[test]
    fn a_result_ack_is_in_the_event_log_before_the_result_leaves_the_journal() {
        use tether_proto::msg::{Ack, Disposition, TaskResult};
        use tether_proto::{Attempt, TaskId};
        let order = Arc::new(Mutex::new(Vec::new()));
        let outbox = crate::outbox::Outbox::new(Default::default())
            .with_journal(Arc::new(Order(order.clone())));
        let task = TaskId::parse("t").expect("id");
        let seq = outbox.push(Class::Result, None, |seq| {
            WorkerMsg::TaskResult(TaskResult {
                seq,
                task_id: task.clone(),
                attempt: Attempt(2),
                outcome: tether_proto::Outcome::Completed,
                result: serde_json::json!({}).into(),
                error: None,
                worker_fault: false,
                started_at: now(),
                finished_at: now(),
                duration_ms: 0,
                timestamp: now(),
            })
        });
        let ack = Ack {
            ack_seq: seq,
            task_id: Some(task.clone()),
            checkpoint_id: None,
            chunk: None,
            disposition: Disposition::Recorded,
            reason: None,
            timestamp: now(),
        };
        let taken = take_witnessed(
            &outbox,
            &ack,
            true,
            |_| false,
            |event| {
                assert!(
                    matches!(&event, crate::eventlog::Event::ResultAck { task_id, attempt: Some(Attempt(2)), .. } if *task_id == task),
                    "{event:?}"
                );
                order.lock().expect("lock").push("event log: result_ack");
            },
        );
        assert!(taken.is_some(), "the result left the outbox");
        assert_eq!(
            *order.lock().expect("lock"),
            ["event log: result_ack", "journal: removed"]
        );
    }

    #[test]
    fn odd_values_of_a_registration_ack_are_each_named_and_usual_ones_are_not() {
        use tether_proto::msg::Rate;
        let usual = RegistrationAck {
            worker_id: tether_proto::WorkerId::parse("w").expect("id"),
            session_id: 1,
            directives: Vec::new(),
            compression: None,
            batching: Some(Batching {
                max_messages: 64,
                max_bytes: 256 * 1024,
            }),
            compact_acks: true,
            max_frame: Some(1 << 20),
            max_checkpoint: Some(64 << 20),
            message_rate: Some(Rate {
                per_sec: 500.0,
                burst: 1000,
            }),
            byte_rate: Some(Rate {
                per_sec: 4e6,
                burst: 8_000_000,
            }),
            lost_after_ms: Some(60_000),
            timestamp: now(),
        };
        assert!(odd_in_ack(&usual).is_empty(), "{:?}", odd_in_ack(&usual));
        // Absent limits are not odd: the coordinator says none.
        let silent = RegistrationAck {
            batching: None,
            max_frame: None,
            max_checkpoint: None,
            message_rate: None,
            byte_rate: None,
            ..usual.clone()
        };
        assert!(odd_in_ack(&silent).is_empty());
        let rate = |per_sec| Some(Rate { per_sec, burst: 1 });
        for (ack, said) in [
            (
                RegistrationAck {
                    max_frame: Some(10),
                    ..usual.clone()
                },
                "max_frame 10 bytes",
            ),
            (
                RegistrationAck {
                    max_checkpoint: Some(0),
                    ..usual.clone()
                },
                "max_checkpoint 0",
            ),
            (
                RegistrationAck {
                    message_rate: rate(f64::NAN),
                    ..usual.clone()
                },
                "message_rate of NaN messages a second is no rate",
            ),
            (
                RegistrationAck {
                    message_rate: rate(-3.0),
                    ..usual.clone()
                },
                "is ignored",
            ),
            (
                RegistrationAck {
                    message_rate: rate(0.1),
                    ..usual.clone()
                },
                "message_rate of 0.1 messages a second is under 1",
            ),
            (
                RegistrationAck {
                    byte_rate: rate(0.0),
                    ..usual.clone()
                },
                "byte_rate of 0 bytes a second is no rate",
            ),
            (
                RegistrationAck {
                    byte_rate: rate(100.0),
                    ..usual.clone()
                },
                "byte_rate of 100 bytes a second is under 1024",
            ),
            (
                RegistrationAck {
                    batching: Some(Batching {
                        max_messages: 1,
                        max_bytes: 1 << 20,
                    }),
                    ..usual.clone()
                },
                "batching of at most 1 messages",
            ),
        ] {
            let odd = odd_in_ack(&ack);
            assert_eq!(odd.len(), 1, "{odd:?}");
            assert!(odd[0].contains(said), "{odd:?} should say {said:?}");
        }
    }

    #[test]
    fn duties_fall_due_each_on_its_own_period_and_a_late_one_is_not_repeated() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut d = Duties::new(start, [ms(100), ms(250), ms(100), ms(1000)], [1.0; 4]);
        assert_eq!(d.next(), start + ms(100));
        assert_eq!(d.take_due(start + ms(99)).count(), 0);
        let due: Vec<_> = d.take_due(start + ms(100)).collect();
        assert_eq!(due, [Duty::Heartbeat, Duty::Telemetry]);
        // On time: the next is one period after the last due time, not after now.
        assert_eq!(d.next(), start + ms(200));
        let due: Vec<_> = d.take_due(start + ms(203)).collect();
        assert_eq!(due, [Duty::Heartbeat, Duty::Telemetry]);
        assert_eq!(d.next(), start + ms(250));
        // Late by more than a period: done once, and next due a period after now (late by
        // less, as at 203 ms, it kept its cadence).
        let due: Vec<_> = d.take_due(start + ms(700)).collect();
        assert_eq!(due, [Duty::Heartbeat, Duty::Ping, Duty::Telemetry]);
        assert_eq!(d.next(), start + ms(800));
        assert_eq!(d.take_due(start + ms(799)).count(), 0);
        let due: Vec<_> = d.take_due(start + ms(1000)).collect();
        assert_eq!(
            due,
            [Duty::Heartbeat, Duty::Ping, Duty::Telemetry, Duty::StatsLog]
        );
    }

    #[test]
    fn a_duty_is_first_due_at_its_phase_and_then_keeps_its_period() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut d = Duties::new(
            start,
            [ms(100), ms(1000), ms(100), ms(1000)],
            [0.3, 1.0, 0.7, 1.0],
        );
        assert_eq!(d.next(), start + ms(30));
        assert_eq!(
            d.take_due(start + ms(30)).collect::<Vec<_>>(),
            [Duty::Heartbeat]
        );
        assert_eq!(d.next(), start + ms(70));
        assert_eq!(
            d.take_due(start + ms(70)).collect::<Vec<_>>(),
            [Duty::Telemetry]
        );
        assert_eq!(d.next(), start + ms(130));
        assert_eq!(
            d.take_due(start + ms(130)).collect::<Vec<_>>(),
            [Duty::Heartbeat]
        );
        assert_eq!(d.next(), start + ms(170));
    }

    #[test]
    fn a_retuned_duty_keeps_the_share_of_its_period_still_to_run() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut d = Duties::new(start, [ms(100), ms(1000), ms(400), ms(1000)], [1.0; 4]);
        // Half-way through the heartbeat's period, it doubles: due a whole old period later.
        let now = start + ms(50);
        d.retune(now, [ms(200), ms(1000), ms(400), ms(1000)]);
        assert_eq!(d.next[0], now + ms(100));
        assert_eq!(d.every[0], ms(200));
        assert_eq!(
            d.next[2],
            start + ms(400),
            "an unchanged duty keeps its time"
        );
        // Then it keeps the new period.
        let due: Vec<Duty> = d.take_due(now + ms(100)).collect();
        assert_eq!(due, [Duty::Heartbeat]);
        assert_eq!(d.next[0], now + ms(300));
        // Overdue when shortened: due now.
        d.retune(now + ms(400), [ms(50), ms(1000), ms(400), ms(1000)]);
        assert_eq!(d.next[0], now + ms(400));
    }

    #[test]
    fn sessions_started_together_spread_their_duties_over_the_first_period() {
        use rand::SeedableRng;
        let start = Instant::now();
        let every = Duration::from_secs(1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // A fleet of 1,000 sessions started in the same instant.
        let firsts: Vec<Duration> = (0..1000)
            .map(|_| Duties::spread(start, [every; 4], &mut rng).next[2] - start)
            .collect();
        // None later than a period (a heartbeat never comes later than unspread), none in
        // its first half (while a herd registers).
        assert!(firsts.iter().all(|f| *f > every / 2 && *f <= every));
        // Spread over the second half: each tenth of it holds some, none holds a burst.
        let mut tenths = [0u32; 10];
        for f in &firsts {
            tenths[(((f.as_secs_f64() - 0.5) * 20.0) as usize).min(9)] += 1;
        }
        assert!(
            tenths.iter().all(|&n| (50..=150).contains(&n)),
            "{tenths:?}"
        );
        // A session's duties are on phases of their own.
        let d = Duties::spread(start, [every; 4], &mut rng);
        assert!(d.next.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn pings_go_out_only_when_heartbeats_are_rarer() {
        let s = Duration::from_secs;
        assert!(
            !pings_needed(s(5), s(10)),
            "the defaults: heartbeats suffice"
        );
        assert!(!pings_needed(s(10), s(10)));
        assert!(pings_needed(s(20), s(10)));
        // Not needed, the ping duty is never due within a day of sessions, so it wakes nothing.
        let cfg = WorkerConfig::new(
            "ws://127.0.0.1:1",
            tether_proto::WorkerId::parse("w").expect("id"),
        );
        let start = Instant::now();
        let mut d = Duties::new(start, periods(s(5), &cfg, None), [1.0; 4]);
        let mut t = start;
        while t < start + s(86_400) {
            t = d.next();
            assert!(
                d.take_due(t).all(|duty| duty != Duty::Ping),
                "a ping came due at {:?}",
                t - start
            );
        }
        let d = Duties::new(start, periods(s(20), &cfg, None), [1.0; 4]);
        assert_eq!(
            d.next[1] - start,
            cfg.ws_ping_interval,
            "needed, it keeps its period"
        );
        // At a heartbeat budget's interval, none: they would spend what the budget saves; and
        // telemetry is as rare again as heartbeats became.
        let budget = periods(s(20), &cfg, Some(4.0));
        assert_eq!(budget[1], NEVER);
        assert_eq!(budget[2], cfg.telemetry_interval * 4);
    }

    #[test]
    fn what_a_coordinator_asks_of_the_cadence_is_held_within_bounds() {
        let (ms, s) = (Duration::from_millis, Duration::from_secs);
        assert_eq!(followed_interval(0), None, "0 asks nothing");
        assert_eq!(followed_interval(1), Some(ms(10)));
        assert_eq!(followed_interval(5_000), Some(s(5)));
        assert_eq!(followed_interval(u64::MAX), Some(s(60)));
        assert_eq!(followed_timeout(Some(30_000), s(10)), s(30));
        for absurd in [None, Some(0), Some(1)] {
            assert_eq!(followed_timeout(absurd, s(10)), s(20), "{absurd:?}");
        }
        assert_eq!(followed_timeout(Some(u64::MAX), s(60)), s(300));
    }

    /// A heartbeat of more running attempts than the coordinator's frames hold lists those
    /// that fit, and fits; one of a few is left whole.
    #[test]
    fn a_heartbeat_lists_only_the_attempts_that_fit_the_coordinators_frames() {
        use tether_proto::task::TaskRef;
        let limit = tether_proto::settings::MIN_FRAME;
        let long = "t".repeat(tether_proto::ids::MAX_ID_LEN - 8);
        let refs = |n: usize| -> Vec<TaskRef> {
            (0..n)
                .map(|i| TaskRef {
                    task_id: TaskId::parse(&format!("{long}{i:08}")).expect("id"),
                    attempt: tether_proto::Attempt(u32::MAX),
                    paused: true,
                })
                .collect()
        };
        let mut many = refs(1000);
        assert!(fit_active_tasks(&mut many, limit));
        assert!(!many.is_empty() && many.len() < 1000, "{}", many.len());
        let hb = WorkerMsg::Heartbeat(Heartbeat {
            sequence: u64::MAX,
            active_tasks: many,
            timestamp: now(),
        });
        assert!(frame_fits(encode(&hb).len(), limit));
        let mut few = refs(10);
        assert!(!fit_active_tasks(&mut few, limit));
        assert_eq!(few.len(), 10);
    }

    #[test]
    fn a_zero_period_does_not_make_a_duty_due_at_every_round() {
        let start = Instant::now();
        let mut d = Duties::new(start, [Duration::ZERO; 4], [1.0; 4]);
        assert_eq!(d.take_due(start + Duration::from_millis(1)).count(), 4);
        assert_eq!(d.take_due(start + Duration::from_millis(1)).count(), 0);
    }

    /// A window entry answered in order.
    fn sent(seq: u64, bytes: usize, at: Instant) -> Sent {
        Sent {
            seq,
            bytes,
            at,
            delivered: 0,
            read: 0,
            in_order: true,
            backlogged: true,
        }
    }

    /// Messages sent together and acknowledged one a second: each sample is what the link
    /// delivered while that message was on its way (50 kB a second), not its own bytes over
    /// its wait (which would read the fourth at 12.5 kB/s).
    #[tokio::test(start_paused = true)]
    async fn the_window_holds_about_a_second_of_what_the_link_delivers() {
        let mut w = Window::default();
        assert_eq!(w.limit, link::MAX_WINDOW, "before a sample");
        let t0 = Instant::now();
        for seq in 1..=4 {
            w.enter(sent(seq, 50_000, t0));
        }
        for seq in 1..=4 {
            tokio::time::advance(Duration::from_secs(1)).await;
            w.leave(seq);
        }
        assert_eq!(w.rate_moved(Instant::now()), Some(50_000.0));
        assert_eq!(w.limit, 50_000);
        assert_eq!(w.rate_moved(Instant::now()), None, "published once");
    }

    /// A path of 1.2 s whose heartbeats all measured a queue (an upload from the registration
    /// on), the link faster than the window: each round a checkpoint's announcement and a
    /// window of its pieces go whole and are acknowledged 1.2 s later. The announcement's
    /// round trip keeps the window whole (it grows by (1.2 + 1) / 1.2 a round until the cap);
    /// without it, a window of a second of what the window itself carried shrank by 1.2 each
    /// time the rate's samples turned over (to 334 KiB within these 12 s), down to 32 KiB.
    #[tokio::test(start_paused = true)]
    async fn a_window_on_a_path_slower_than_a_second_stays_whole_with_no_heartbeat_measured() {
        let mut w = Window::default();
        let mut seq = 0;
        for _ in 0..10 {
            let t0 = Instant::now();
            let first = seq + 1;
            seq += 1;
            w.enter(sent(seq, 300, t0));
            while w.bytes + 16_384 <= w.limit {
                seq += 1;
                w.enter(sent(seq, 16_384, t0));
            }
            tokio::time::advance(Duration::from_millis(1_200)).await;
            for s in first..=seq {
                w.leave(s);
            }
        }
        assert_eq!(w.limit, link::MAX_WINDOW);
    }

    /// An idle worker's reports over a 300 ms path, each sent with nothing behind it: they
    /// size the window (as every sample does) but the rate shown is not theirs (3 kB/s, a
    /// figure of how little there was to send); a burst sent with more waiting is.
    #[tokio::test(start_paused = true)]
    async fn the_rate_shown_is_measured_only_while_more_waits_to_go() {
        let mut w = Window::default();
        for seq in 1..=3 {
            tokio::time::advance(Duration::from_secs(30)).await;
            w.enter(Sent {
                backlogged: false,
                ..sent(seq, 900, Instant::now())
            });
            tokio::time::advance(Duration::from_millis(300)).await;
            w.leave(seq);
        }
        assert_eq!(w.rate_moved(Instant::now()), Some(3_000.0));
        assert_eq!(
            w.shown_moved(Instant::now()),
            None,
            "nothing measured the link"
        );
        let t = Instant::now();
        for seq in 4..=8 {
            w.enter(Sent {
                backlogged: seq < 8,
                ..sent(seq, 60_000, t)
            });
        }
        tokio::time::advance(Duration::from_millis(300)).await;
        for seq in 4..=8 {
            w.leave(seq);
        }
        assert_eq!(
            w.shown_moved(Instant::now()),
            Some(800_000.0),
            "four of five counted"
        );
        assert_eq!(w.shown_moved(Instant::now()), None, "published once");
    }

    #[test]
    fn a_wait_for_the_window_counts_once_however_long_it_lasts() {
        let mut w = Window::default();
        let waits: Vec<bool> = [false, true, true, true, false, true, false]
            .into_iter()
            .map(|waiting| w.held_back(waiting))
            .collect();
        assert_eq!(waits, [false, true, false, false, false, true, false]);
    }

    /// A fetch answered two seconds after it was sent, 32 kB read meanwhile: the link
    /// delivers 16 kB a second to this worker; the fetch leaves the window.
    #[tokio::test(start_paused = true)]
    async fn a_fetch_answered_measures_what_the_link_delivers_to_the_worker() {
        let mut w = Window::default();
        let mut fetch = sent(1, 200, Instant::now());
        fetch.read = 1_000;
        w.enter(fetch);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(w.fetched(1, 33_000), Some(16_000.0));
        assert_eq!(w.bytes, 0);
    }

    #[test]
    fn the_window_counts_each_sent_message_once_until_acked_in_any_order() {
        let mut w = Window::default();
        let at = Instant::now();
        // Results go first, so sequence numbers are not always sent in order.
        for (seq, bytes) in [(5, 50), (7, 70), (2, 20), (9, 90)] {
            w.enter(sent(seq, bytes, at));
        }
        assert_eq!(w.bytes, 230);
        let order: Vec<u64> = w.sent.iter().map(|e| e.seq).collect();
        assert_eq!(order, vec![2, 5, 7, 9], "kept in sequence order");
        // Sent again in the same session (sync_state): counted once, at its new size.
        w.enter(sent(7, 75, at));
        assert_eq!(w.bytes, 235);
        w.leave(5);
        w.leave(5);
        w.leave(42);
        assert_eq!(w.bytes, 185, "a repeated or unknown ack frees nothing");
        for seq in [9, 2, 7] {
            w.leave(seq);
        }
        assert_eq!((w.bytes, w.sent.len()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_is_lost_when_nothing_or_a_later_message_was_acknowledged_since() {
        let timeout = Duration::from_secs(15);
        let tick = || tokio::time::sleep(Duration::from_secs(5));
        // Nothing acknowledged at all for the timeout: lost.
        let mut w = Window::default();
        w.enter(sent(1, 10, Instant::now()));
        tick().await;
        assert_eq!(w.lost(timeout), None, "not waited long enough");
        tokio::time::sleep(timeout).await;
        assert_eq!(w.lost(timeout).map(|l| l.0), Some(1));
        // A slow link: the messages before it acknowledged in order, the last a moment ago;
        // it waits longer than the timeout but is not known lost.
        let mut w = Window::default();
        for seq in 1..=4 {
            w.enter(sent(seq, 10, Instant::now()));
        }
        for seq in 1..=3 {
            tick().await;
            w.leave(seq);
        }
        tick().await;
        assert_eq!(
            w.lost(timeout),
            None,
            "acknowledgements still trickle in, in order"
        );
        // A message sent after it was acknowledged: it was lost on the way.
        w.enter(sent(5, 10, Instant::now()));
        tick().await;
        w.leave(5);
        assert_eq!(w.lost(timeout).map(|l| l.0), Some(4));
    }

    /// Nothing acknowledged for longer than the timeout, but the coordinator heard from within
    /// it (its ping while our frame arrives, or a frame of its own arriving): not lost, until
    /// the timeout passed since it was last heard. A later message acknowledged still tells a
    /// message lost, heard or not.
    #[tokio::test(start_paused = true)]
    async fn a_message_is_not_lost_while_the_coordinator_is_heard_reading_or_sending() {
        let timeout = Duration::from_secs(15);
        let mut w = Window::default();
        w.enter(sent(1, 10, Instant::now()));
        tokio::time::sleep(Duration::from_secs(10)).await;
        w.heard(Instant::now());
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(w.lost(timeout), None, "heard 10 s ago");
        w.heard(Instant::now());
        tokio::time::sleep(Duration::from_secs(14)).await;
        assert_eq!(w.lost(timeout), None, "heard 14 s ago");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            w.lost(timeout).map(|l| l.0),
            Some(1),
            "not heard for the timeout"
        );
        // An older hearing does not move a later one back.
        let mut w = Window::default();
        w.enter(sent(1, 10, Instant::now()));
        let early = Instant::now();
        tokio::time::sleep(Duration::from_secs(10)).await;
        w.heard(Instant::now());
        w.heard(early);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(w.lost(timeout), None);
        // Heard or not, a message sent after it and acknowledged tells it lost.
        w.enter(sent(2, 10, Instant::now()));
        w.leave(2);
        w.heard(Instant::now());
        assert_eq!(w.lost(timeout).map(|l| l.0), Some(1));
    }

    /// A fetch's piece is read from the store apart from the commits that acknowledge the rest:
    /// a fetch whose piece comes after the acks of later messages is not taken for lost, and
    /// its piece coming first does not make an earlier message lost; silence still counts.
    #[tokio::test(start_paused = true)]
    async fn a_fetch_answered_out_of_order_is_not_lost_nor_makes_others_lost() {
        let timeout = Duration::from_secs(15);
        let fetch = |seq| Sent {
            in_order: false,
            ..sent(seq, 10, Instant::now())
        };
        let mut w = Window::default();
        w.enter(fetch(1));
        tokio::time::sleep(Duration::from_secs(1)).await;
        w.enter(sent(2, 10, Instant::now()));
        w.leave(2);
        tokio::time::sleep(timeout).await;
        w.enter(sent(3, 10, Instant::now()));
        w.leave(3);
        assert_eq!(w.lost(timeout), None, "the fetch's piece is still coming");
        // A message sent before a fetch whose piece came first is not overtaken by it.
        let mut w = Window::default();
        w.enter(sent(1, 10, Instant::now()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        w.enter(fetch(2));
        w.leave(2);
        tokio::time::sleep(timeout).await;
        w.enter(fetch(3));
        w.leave(3);
        assert_eq!(
            w.lost(timeout),
            None,
            "pieces say nothing of the commits' order"
        );
        // A link silent for the timeout loses a fetch like anything else.
        let mut w = Window::default();
        w.enter(fetch(1));
        tokio::time::sleep(timeout).await;
        assert_eq!(w.lost(timeout).map(|l| l.0), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_names_the_message_waiting_longest_for_its_acknowledgement() {
        let mut w = Window::default();
        assert_eq!(w.oldest(), None);
        let t0 = Instant::now();
        w.enter(sent(3, 10, t0));
        tokio::time::sleep(Duration::from_secs(1)).await;
        w.enter(sent(1, 10, Instant::now()));
        assert_eq!(
            w.oldest(),
            Some((3, t0)),
            "by send time, not sequence number"
        );
        // Sent again in the session (a `sync_state` directive): its wait starts over.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t2 = Instant::now();
        w.enter(sent(3, 10, t2));
        assert_eq!(w.oldest().map(|o| o.0), Some(1));
        w.leave(1);
        assert_eq!(w.oldest(), Some((3, t2)));
    }
}
