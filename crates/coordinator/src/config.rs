//! Coordinator settings, each default a named constant.

use std::path::PathBuf;
use std::time::Duration;

use crate::auth::{ApiTokens, WorkerAuth};

/// Default heartbeat interval announced to workers.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Default silence after which a session is closed (the worker is then disconnected).
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(15);
/// Shortest heartbeat interval a coordinator may announce: below it the fleet's heartbeats are
/// all the coordinator does (a worker answered a 0 s interval with about 600 beats a second).
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);
/// Shortest grace period (`lost_after`) accepted: a worker's sessions end on any network blip,
/// and under it every blip would move every task of the worker.
pub const MIN_LOST_AFTER: Duration = Duration::from_secs(1);
/// Smallest frame limit: a worker's checkpoint piece (256 KiB, about 342 KiB as base64 in its
/// JSON) and a batch frame must fit, or the session that carries one ends each time it is sent.
pub const MIN_MAX_FRAME: usize = 1024 * 1024;
/// Shortest handshake deadline accepted: a connection's request must be read and its answer
/// begun within it, over TLS its handshake too, and a large answer waits up to half of it for
/// its turn; at 0 every connection (health checks, API, worker upgrades) was closed unanswered.
pub const MIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(100);
/// Shortest idle time of an HTTP connection accepted: at 0 every answer was cut after its
/// first write, event streams among them.
pub const MIN_HTTP_IDLE: Duration = Duration::from_millis(100);
/// Shortest sweeper period accepted: a sweep goes over the leases and the lost workers, and
/// 0 is no period (the core's timer panicked at the start).
pub const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(10);
/// Shortest period of the dashboard's samples accepted: each asks the core for its overview,
/// and 0 is no period (the sampler's timer panicked, and the charts stayed empty).
pub const MIN_HISTORY_INTERVAL: Duration = Duration::from_millis(10);
/// Default heartbeat budget: the fleet's heartbeats a second the coordinator plans for. Up to
/// 5,000 workers beat at the configured interval; a larger fleet is told a longer one (10 s at
/// 10,000 workers), as HashiCorp Nomad sizes its clients' heartbeat TTL to its fleet.
pub const DEFAULT_HEARTBEAT_BUDGET: u32 = 1_000;
/// Default time a disconnected worker keeps its leases.
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(60);
/// Default sweeper period.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Default largest checkpoint accepted. It travels in pieces both ways (uploaded in
/// `checkpoint_data`, fetched by a resumed attempt with `checkpoint_fetch`), so no frame bounds
/// it; a worker holds its task's latest in memory.
pub const DEFAULT_MAX_CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
/// Default number of checkpoints kept per task.
pub const DEFAULT_CHECKPOINTS_KEPT: usize = 3;
/// Default largest number of tasks in one submission.
pub const DEFAULT_MAX_SUBMIT_BATCH: usize = 10_000;
/// Default largest HTTP request body.
pub const DEFAULT_MAX_BODY: usize = 16 * 1024 * 1024;
/// Default retention of finished tasks: kept until removed by hand.
pub const DEFAULT_RETENTION: Option<Duration> = None;
/// Default period of the dashboard's chart samples (one hour is kept).
pub const DEFAULT_HISTORY_INTERVAL: Duration = Duration::from_secs(10);
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./tether-data";

/// Default cap on open connections (workers, API clients, handshakes in progress).
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// Default new connections per second accepted from one source address.
pub const DEFAULT_CONNECTS_PER_SEC: f64 = 20.0;
/// Default burst of new connections from one source address.
pub const DEFAULT_CONNECT_BURST: u32 = 100;
/// Default time a new connection has to get the server's first byte (a response, or the 101
/// of an upgrade) by completing its request.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time an HTTP connection between requests (or one whose reader stopped reading its
/// answer) may move no byte either way before it is closed. Longer than twice the event
/// stream's keep-alive, so a dashboard or `tether watch` left open is not cut.
pub const DEFAULT_HTTP_IDLE: Duration = Duration::from_secs(60);
/// Default bytes a second an HTTP answer must move, on average, while its reader keeps it
/// waiting (its writes find the socket full), with `http_idle` of slack: a reader that frees a
/// little of its socket's buffer now and then moves bytes, so the idle close never comes, and
/// would otherwise hold the answer (and its turn of `http::HEAVY_AT_ONCE`) for as long as it
/// likes. 512 kbit/s: an honest client on any link but the slowest keeps up.
pub const DEFAULT_MIN_ANSWER_RATE: u64 = 64 * 1024;
/// Highest minimum answer rate accepted: more than a gigabit link carries (about 119 MiB/s),
/// so every reader on one, or on anything slower, would have its larger answers cut.
pub const MAX_MIN_ANSWER_RATE: u64 = 128 * 1024 * 1024;
/// Default messages per second of one worker session, sustained.
pub const DEFAULT_MESSAGES_PER_SEC: f64 = 2000.0;
/// Default burst of messages of one worker session.
pub const DEFAULT_MESSAGE_BURST: u32 = 4000;
/// Default bytes per second of one worker session, sustained, counted on each frame's text as
/// decoded (after inflating, for a compressed frame): what inflating and parsing cost. A worker
/// of the message flood (200 updates a second) sends about 60 KiB a second, a checkpoint of
/// 64 MiB is about 85 MiB of base64 JSON; so only a session that makes the coordinator inflate
/// and parse far more than any worker needs is ever paced.
pub const DEFAULT_BYTES_PER_SEC: f64 = 64.0 * 1024.0 * 1024.0;
/// Default burst of bytes of one worker session: three of the largest checkpoints
/// ([`DEFAULT_MAX_CHECKPOINT_BYTES`], as base64 JSON) in a row go through at once.
pub const DEFAULT_BYTE_BURST: u32 = 256 * 1024 * 1024;
/// Default bytes that WebSocket connections still registering may read beyond their own
/// [`PRE_REGISTRATION_BYTES`](crate::admission::PRE_REGISTRATION_BYTES), all together: a
/// registration is small, but one whose inventory lists thousands of unacknowledged results
/// (a worker back from a long outage; its outbox holds up to 10,000) runs to hundreds of KiB.
pub const DEFAULT_REGISTRATION_POOL: usize = 64 * 1024 * 1024;

/// Limits against floods and exhaustion; see `admission` and `ws`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub connects_per_sec: f64,
    pub connect_burst: u32,
    /// Apply the per-address rate to loopback clients too (off by default: local processes,
    /// tests and `tether stress` open many connections from 127.0.0.1).
    pub limit_loopback: bool,
    /// Time a request has to get the first byte of its answer, from its first byte read (the
    /// first request of a connection: from the accept). Slow-loris guard.
    pub handshake_timeout: Duration,
    /// Time an HTTP connection that is not reading a request may move no byte either way:
    /// idle between requests, or its reader stopped reading the answer.
    pub http_idle: Duration,
    /// Bytes a second an HTTP answer must move, on average, while its reader keeps it
    /// waiting; a reader slower than this for about `http_idle` is cut (see `admission`).
    pub min_answer_rate: u64,
    pub messages_per_sec: f64,
    pub message_burst: u32,
    /// Decoded bytes per second of one worker session, and their burst; over it the session
    /// stops reading, as over its message rate.
    pub bytes_per_sec: f64,
    pub byte_burst: u32,
    /// Bytes shared by the WebSocket connections whose reading before their registration runs
    /// past their own [`PRE_REGISTRATION_BYTES`](crate::admission::PRE_REGISTRATION_BYTES)
    /// (see `admission`).
    pub registration_pool: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            connects_per_sec: DEFAULT_CONNECTS_PER_SEC,
            connect_burst: DEFAULT_CONNECT_BURST,
            limit_loopback: false,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            http_idle: DEFAULT_HTTP_IDLE,
            min_answer_rate: DEFAULT_MIN_ANSWER_RATE,
            messages_per_sec: DEFAULT_MESSAGES_PER_SEC,
            message_burst: DEFAULT_MESSAGE_BURST,
            bytes_per_sec: DEFAULT_BYTES_PER_SEC,
            byte_burst: DEFAULT_BYTE_BURST,
            registration_pool: DEFAULT_REGISTRATION_POOL,
        }
    }
}

impl Limits {
    /// Messages a second of one worker session.
    pub fn message_rate(&self) -> crate::admission::Rate {
        crate::admission::Rate::new(self.messages_per_sec, self.message_burst)
    }

    /// Decoded bytes a second of one worker session.
    pub fn byte_rate(&self) -> crate::admission::Rate {
        crate::admission::Rate::new(self.bytes_per_sec, self.byte_burst)
    }
}

/// Everything a coordinator needs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// Heartbeats a second the whole fleet may send (0: no limit): past `budget × interval`
    /// workers, sessions are told a longer interval, and the timeout grows in proportion.
    pub heartbeat_budget: u32,
    pub lost_after: Duration,
    pub sweep_interval: Duration,
    pub max_frame: usize,
    pub max_checkpoint_bytes: u64,
    pub checkpoints_kept: usize,
    pub max_submit_batch: usize,
    pub max_body: usize,
    /// Finished tasks (with their results, state and checkpoints) older than this are removed.
    pub retention: Option<Duration>,
    /// Period of the dashboard's chart samples.
    pub history_interval: Duration,
    /// Worker authentication; `None` lets any client register under any id (loopback use).
    pub auth: Option<WorkerAuth>,
    /// Bearer tokens of the HTTP API; without them only a loopback address is served.
    pub api_tokens: Option<ApiTokens>,
    /// Connection and message rate limits.
    pub limits: Limits,
    /// Serve TLS (`wss://`, `https://`) with this configuration; plain TCP when `None`.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// Agree to zstd compression when a worker offers it.
    pub compression: bool,
    /// Messages of at least this many bytes of JSON go compressed once agreed.
    pub compress_threshold: usize,
    /// Agree to batch frames when a worker offers them.
    pub batching: bool,
    /// What an acknowledged commit survives.
    pub durability: crate::store::Durability,
    /// Checks each submitted task's config for its kind; a task it refuses is refused at
    /// submission (`tether coordinator` gives the built-in executors' checks). `None`: any.
    pub config_check: Option<ConfigCheck>,
}

/// A check of task configs by kind: given a task's kind and its config's JSON text, `None`
/// for a kind it knows nothing of, else whether that kind's executor would take the config
/// (`Err` says why not).
#[derive(Clone)]
pub struct ConfigCheck(pub std::sync::Arc<CheckConfig>);

/// The function of a [`ConfigCheck`].
pub type CheckConfig = dyn Fn(&str, &str) -> Option<Result<(), String>> + Send + Sync;

impl std::fmt::Debug for ConfigCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigCheck")
    }
}

/// A session's heartbeat cadence: how often its worker beats, and the silence after which the
/// session is closed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Beat {
    pub interval: Duration,
    pub timeout: Duration,
}

impl CoordinatorConfig {
    /// Refuses settings no run can work with (`run` calls it): a heartbeat interval under
    /// [`MIN_HEARTBEAT_INTERVAL`] or a timeout not longer than it, frames too small for a
    /// message's envelope, a checkpoint bound, connection limit or body limit of 0, a message,
    /// connection or byte rate that is not a positive number (0 does not mean unlimited), a
    /// handshake deadline or HTTP idle time under 100 ms ([`MIN_HANDSHAKE_TIMEOUT`],
    /// [`MIN_HTTP_IDLE`]), a minimum answer rate of 0 or above [`MAX_MIN_ANSWER_RATE`], a
    /// sweep or sample period under 10 ms ([`MIN_SWEEP_INTERVAL`], [`MIN_HISTORY_INTERVAL`]). The `tether coordinator` command asks more of some (frames
    /// of 1 MiB at least).
    pub fn validate(&self) -> Result<(), tether_proto::settings::ConfigError> {
        use tether_proto::settings::{ConfigError, check_frame, check_heartbeat};
        check_heartbeat(
            self.heartbeat_interval,
            self.heartbeat_timeout,
            MIN_HEARTBEAT_INTERVAL,
        )?;
        check_frame(self.max_frame)?;
        if self.lost_after < MIN_LOST_AFTER {
            return Err(ConfigError::new(
                "lost_after",
                format!(
                    "{} ms would move every task of a worker at its first blip: at least {} s",
                    self.lost_after.as_millis(),
                    MIN_LOST_AFTER.as_secs()
                ),
            ));
        }
        if self.max_checkpoint_bytes == 0 {
            return Err(ConfigError::new(
                "max_checkpoint_bytes",
                "0 refuses every checkpoint: at least 1",
            ));
        }
        let most = tether_proto::codec::MAX_CHECKPOINT_BYTES;
        if self.max_checkpoint_bytes > most {
            return Err(ConfigError::new(
                "max_checkpoint_bytes",
                format!(
                    "{} bytes: workers fetch checkpoints of at most {most} bytes (1 GiB), so a larger one kept here would never be resumed from",
                    self.max_checkpoint_bytes
                ),
            ));
        }
        if self.limits.max_connections == 0 {
            return Err(ConfigError::new(
                "max_connections",
                "0 refuses every connection: at least 1",
            ));
        }
        if self.max_body == 0 {
            return Err(ConfigError::new(
                "max_body",
                "0 refuses every request with a body, every submission among them: at least 1",
            ));
        }
        let l = &self.limits;
        for (field, value, least, why) in [
            (
                "handshake_timeout",
                l.handshake_timeout,
                MIN_HANDSHAKE_TIMEOUT,
                "would close connections before their request could be read and answered",
            ),
            (
                "http_idle",
                l.http_idle,
                MIN_HTTP_IDLE,
                "would cut answers and event streams as soon as they pause",
            ),
            (
                "sweep_interval",
                self.sweep_interval,
                MIN_SWEEP_INTERVAL,
                "would keep the core sweeping leases and lost workers (0 stopped it at the start)",
            ),
            (
                "history_interval",
                self.history_interval,
                MIN_HISTORY_INTERVAL,
                "would keep the core making the dashboard's samples (0 stopped them at the start)",
            ),
        ] {
            if value < least {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "{} ms {why}: at least {} ms",
                        value.as_millis(),
                        least.as_millis()
                    ),
                ));
            }
        }
        // The slack of a slow reader is earned back at one second per `min_answer_rate` bytes:
        // at 0 it never is (and the division gave no duration); past a gigabit link's bytes a
        // second, every honest reader's answers would be cut.
        if l.min_answer_rate == 0 || l.min_answer_rate > MAX_MIN_ANSWER_RATE {
            return Err(ConfigError::new(
                "min_answer_rate",
                format!(
                    "{} bytes a second {}: 1 to {MAX_MIN_ANSWER_RATE} (the default is {DEFAULT_MIN_ANSWER_RATE}, 64 KiB/s)",
                    l.min_answer_rate,
                    if l.min_answer_rate == 0 {
                        "would never let a reader that keeps its answer waiting earn its slack back"
                    } else {
                        "is more than a gigabit link carries: every reader's larger answers would be cut"
                    }
                ),
            ));
        }
        // A worker paces its messages, heartbeats among them, by the rate it is told: below a
        // heartbeat per heartbeat interval its sessions would time out (and a rate near zero
        // made the wait for the next token overflow in workers).
        let least = 1.0 / self.heartbeat_interval.as_secs_f64();
        if l.messages_per_sec.is_finite() && l.messages_per_sec < least {
            return Err(ConfigError::new(
                "max_messages_per_sec",
                format!(
                    "{} would not let a worker send a heartbeat per heartbeat interval ({:.1} s): at least {least}",
                    l.messages_per_sec,
                    self.heartbeat_interval.as_secs_f64()
                ),
            ));
        }
        // Rates are tokens a second: 0 (or not a number) would never give the next token (a
        // session over its burst would wait for ever; the wait's length is not even a
        // duration, and computing it panicked). There is no "unlimited": set a high rate.
        for (field, rate) in [
            ("max_messages_per_sec", l.messages_per_sec),
            ("connects_per_sec", l.connects_per_sec),
        ] {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(ConfigError::new(
                    field,
                    format!("{rate} is no rate: a positive number of tokens a second"),
                ));
            }
        }
        // A session over its byte rate reads nothing, heartbeats included, until the rate
        // allows the next frame: the largest frame must not keep it waiting near its timeout.
        let frame = self.max_frame as f64;
        let longest_wait = frame / l.bytes_per_sec;
        let allowed = self.heartbeat_timeout.as_secs_f64() / 3.0;
        if !(l.bytes_per_sec.is_finite() && l.bytes_per_sec > 0.0) || longest_wait > allowed {
            return Err(ConfigError::new(
                "max_bytes_per_sec",
                format!(
                    "{} would hold a session {longest_wait:.1} s for one largest frame ({} bytes), past a third of the heartbeat timeout ({allowed:.1} s): at least {:.0}",
                    l.bytes_per_sec,
                    self.max_frame,
                    (frame / allowed).ceil()
                ),
            ));
        }
        if (l.byte_burst as usize) < self.max_frame {
            return Err(ConfigError::new(
                "byte_burst",
                format!(
                    "{} is below the largest frame ({} bytes): at least that",
                    l.byte_burst, self.max_frame
                ),
            ));
        }
        Ok(())
    }

    /// The cadence for a fleet of `sessions`: the configured one, or, when that fleet would beat
    /// more often than the heartbeat budget allows, an interval that keeps it within the budget
    /// (in whole milliseconds) and a timeout stretched in proportion.
    pub fn beat(&self, sessions: u64) -> Beat {
        let configured = Beat {
            interval: self.heartbeat_interval,
            timeout: self.heartbeat_timeout,
        };
        if self.heartbeat_budget == 0 {
            return configured;
        }
        let needed_ms = sessions.saturating_mul(1000) / u64::from(self.heartbeat_budget);
        let needed = Duration::from_millis(needed_ms);
        if needed <= self.heartbeat_interval {
            return configured;
        }
        let stretch = needed.as_secs_f64() / self.heartbeat_interval.as_secs_f64().max(1e-3);
        Beat {
            interval: needed,
            timeout: Duration::from_millis(
                (self.heartbeat_timeout.as_secs_f64() * stretch * 1e3).round() as u64,
            ),
        }
    }
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            heartbeat_budget: DEFAULT_HEARTBEAT_BUDGET,
            lost_after: DEFAULT_LOST_AFTER,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            max_frame: tether_proto::codec::DEFAULT_MAX_FRAME,
            max_checkpoint_bytes: DEFAULT_MAX_CHECKPOINT_BYTES,
            checkpoints_kept: DEFAULT_CHECKPOINTS_KEPT,
            max_submit_batch: DEFAULT_MAX_SUBMIT_BATCH,
            max_body: DEFAULT_MAX_BODY,
            retention: DEFAULT_RETENTION,
            history_interval: DEFAULT_HISTORY_INTERVAL,
            auth: None,
            api_tokens: None,
            limits: Limits::default(),
            tls: None,
            compression: true,
            compress_threshold: tether_proto::compress::DEFAULT_THRESHOLD,
            batching: true,
            durability: crate::store::Durability::Process,
            config_check: None,
        }
    }

    /// The batch frames agreed with a worker that offers them: at most
    /// [`MAX_BATCH_BYTES`](tether_proto::codec::MAX_BATCH_BYTES), and half the frame limit, so
    /// that a batch (compressed or not) always fits in a frame.
    pub fn batching(&self) -> Option<tether_proto::msg::Batching> {
        self.batching.then(|| tether_proto::msg::Batching {
            max_messages: tether_proto::codec::MAX_BATCH_MESSAGES,
            max_bytes: tether_proto::codec::MAX_BATCH_BYTES.min(self.max_frame as u64 / 2),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each setting no run can work with is refused by its field name, and a coordinator is not
    /// started on it (nor its data directory made); the defaults and the least of each pass.
    #[tokio::test]
    async fn settings_that_would_stop_the_work_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let base = || CoordinatorConfig::new(&data);
        base().validate().expect("the defaults");
        type Spoil = fn(&mut CoordinatorConfig);
        let cases: [(&str, Spoil); 25] = [
            ("lost_after", |c| c.lost_after = Duration::ZERO),
            ("heartbeat_interval", |c| {
                c.heartbeat_interval = Duration::ZERO
            }),
            ("heartbeat_timeout", |c| {
                c.heartbeat_timeout = c.heartbeat_interval
            }),
            ("max_frame", |c| c.max_frame = 1024),
            ("max_frame", |c| {
                c.max_frame = tether_proto::settings::MAX_FRAME + 1
            }),
            ("max_checkpoint_bytes", |c| c.max_checkpoint_bytes = 0),
            ("max_checkpoint_bytes", |c| {
                c.max_checkpoint_bytes = tether_proto::codec::MAX_CHECKPOINT_BYTES + 1
            }),
            ("max_connections", |c| c.limits.max_connections = 0),
            ("max_body", |c| c.max_body = 0),
            // 16 MiB at 1 MiB/s: a session held 16 s, past a third of 15 s.
            ("max_bytes_per_sec", |c| {
                c.limits.bytes_per_sec = 1024.0 * 1024.0
            }),
            ("max_bytes_per_sec", |c| c.limits.bytes_per_sec = f64::NAN),
            ("byte_burst", |c| c.limits.byte_burst = 1024),
            // 0 messages a second panicked in the first session over its burst.
            ("max_messages_per_sec", |c| c.limits.messages_per_sec = 0.0),
            ("max_messages_per_sec", |c| c.limits.messages_per_sec = -1.0),
            ("max_messages_per_sec", |c| {
                c.limits.messages_per_sec = f64::NAN
            }),
            // Told to its workers, 1e-20 made their wait for the next token overflow.
            ("max_messages_per_sec", |c| {
                c.limits.messages_per_sec = 1e-20
            }),
            ("max_messages_per_sec", |c| {
                c.heartbeat_interval = Duration::from_secs(4);
                c.limits.messages_per_sec = 0.2;
            }),
            ("connects_per_sec", |c| c.limits.connects_per_sec = 0.0),
            ("connects_per_sec", |c| {
                c.limits.connects_per_sec = f64::INFINITY
            }),
            // Every connection was closed unanswered, its deadline passed at the accept.
            ("handshake_timeout", |c| {
                c.limits.handshake_timeout = Duration::ZERO
            }),
            // The core's sweep timer panicked, and `run` reported a store failure.
            ("sweep_interval", |c| c.sweep_interval = Duration::ZERO),
            // The dashboard's sampler panicked, and the charts stopped.
            ("history_interval", |c| c.history_interval = Duration::ZERO),
            // Every event stream was cut after its first write.
            ("http_idle", |c| c.limits.http_idle = Duration::ZERO),
            // No slack is ever earned back: every answer that waits for its reader is cut.
            ("min_answer_rate", |c| c.limits.min_answer_rate = 0),
            ("min_answer_rate", |c| {
                c.limits.min_answer_rate = MAX_MIN_ANSWER_RATE + 1
            }),
        ];
        for (field, spoil) in cases {
            let mut c = base();
            spoil(&mut c);
            assert_eq!(c.validate().map_err(|e| e.field), Err(field));
        }
        let mut least = base();
        least.heartbeat_interval = MIN_HEARTBEAT_INTERVAL;
        least.heartbeat_timeout = MIN_HEARTBEAT_INTERVAL * 2;
        least.max_frame = tether_proto::settings::MIN_FRAME;
        least.max_checkpoint_bytes = 1;
        least.lost_after = MIN_LOST_AFTER;
        least.limits.handshake_timeout = MIN_HANDSHAKE_TIMEOUT;
        least.limits.http_idle = MIN_HTTP_IDLE;
        least.limits.min_answer_rate = 1;
        least.sweep_interval = MIN_SWEEP_INTERVAL;
        least.history_interval = MIN_HISTORY_INTERVAL;
        least.validate().expect("the least of each");
        let mut c = base();
        c.heartbeat_interval = Duration::ZERO;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let e = crate::server::run(listener, c, shutdown)
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("heartbeat_interval"), "{e}");
        assert!(!data.exists(), "nothing made for a refused configuration");
    }

    /// A minimum answer rate of 0 (no slack ever earned back) or past a gigabit link's is
    /// refused, saying why and what is accepted; the default and the bounds pass.
    #[test]
    fn a_minimum_answer_rate_of_zero_or_past_a_gigabit_link_is_refused_clearly() {
        let with = |rate| {
            let mut c = CoordinatorConfig::new("/unused");
            c.limits.min_answer_rate = rate;
            c.validate()
        };
        let zero = with(0).expect_err("0 refused");
        assert_eq!(zero.field, "min_answer_rate");
        assert_eq!(
            zero.why,
            "0 bytes a second would never let a reader that keeps its answer waiting earn its slack back: 1 to 134217728 (the default is 65536, 64 KiB/s)"
        );
        let fast = with(MAX_MIN_ANSWER_RATE + 1).expect_err("too fast refused");
        assert!(
            fast.why
                .starts_with("134217729 bytes a second is more than a gigabit link carries"),
            "{}",
            fast.why
        );
        for rate in [1, DEFAULT_MIN_ANSWER_RATE, MAX_MIN_ANSWER_RATE] {
            with(rate).expect("accepted");
        }
        assert_eq!(Limits::default().min_answer_rate, 64 * 1024);
    }

    /// A message rate of 0 is refused by `run`, naming it, before anything starts: it is not
    /// "unlimited", and a session over its burst at that rate panicked.
    #[tokio::test]
    async fn a_message_rate_of_zero_is_refused_with_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = CoordinatorConfig::new(dir.path().join("data"));
        c.limits.messages_per_sec = 0.0;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let run = crate::server::run(listener, c, shutdown.clone());
        let ran = tokio::time::timeout(Duration::from_secs(10), run).await;
        shutdown.cancel();
        let e = ran
            .expect("refused at once, not started")
            .expect_err("refused");
        assert!(e.to_string().contains("max_messages_per_sec"), "{e}");
    }

    #[test]
    fn a_fleet_past_the_heartbeat_budget_is_told_a_longer_interval_and_timeout_in_proportion() {
        let cfg = CoordinatorConfig::new("/unused");
        let configured = Beat {
            interval: DEFAULT_HEARTBEAT_INTERVAL,
            timeout: DEFAULT_HEARTBEAT_TIMEOUT,
        };
        assert_eq!(cfg.beat(0), configured);
        assert_eq!(cfg.beat(5_000), configured, "5,000 × 1/5 s is the budget");
        let s = Duration::from_secs;
        assert_eq!(
            cfg.beat(10_000),
            Beat {
                interval: s(10),
                timeout: s(30)
            }
        );
        assert_eq!(
            cfg.beat(7_500),
            Beat {
                interval: Duration::from_millis(7_500),
                timeout: Duration::from_millis(22_500)
            }
        );
        let unlimited = CoordinatorConfig {
            heartbeat_budget: 0,
            ..cfg
        };
        assert_eq!(unlimited.beat(1_000_000), configured);
    }
}
