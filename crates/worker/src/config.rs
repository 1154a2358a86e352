//! Worker settings, each default a named constant.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tether_proto::WorkerId;
use tether_proto::auth::Secret;

use crate::adaptive::AdaptiveConfig;
use crate::backoff::BackoffConfig;
use crate::executor::DEFAULT_CHUNK_SIZE;
use crate::outbox::Limits;

/// Default application heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Default silence after which a session is declared dead.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(15);
/// Shortest heartbeat interval a worker may be given.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);
/// Default WebSocket ping interval.
pub const DEFAULT_WS_PING_INTERVAL: Duration = Duration::from_secs(10);
/// Default limit on one connect + handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a registered session must last before the backoff resets.
pub const DEFAULT_HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Default telemetry period.
pub const DEFAULT_TELEMETRY_INTERVAL: Duration = Duration::from_secs(30);
/// Default statistics log period.
pub const DEFAULT_STATS_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Default largest frame accepted.
pub const DEFAULT_MAX_FRAME: usize = tether_proto::codec::DEFAULT_MAX_FRAME;
/// Default number of concurrent tasks.
pub const DEFAULT_SLOTS: u32 = 1;
/// Coordinator refusals in a row after which a worker stops for good.
pub const DEFAULT_REFUSALS_BEFORE_STOP: u32 = 3;

/// Everything a worker agent needs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Coordinator base URL or full endpoint URL (see `tether_proto::endpoint`).
    pub coordinator: String,
    pub worker_id: WorkerId,
    pub capabilities: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub slots: u32,
    /// Where the outbox, identity and checkpoints survive restarts; `None` keeps them in memory.
    pub state_dir: Option<PathBuf>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// WebSocket pings, only when heartbeats are rarer (the coordinator answers heartbeats).
    pub ws_ping_interval: Duration,
    pub connect_timeout: Duration,
    pub healthy_after: Duration,
    pub backoff: BackoffConfig,
    pub adaptive: AdaptiveConfig,
    pub telemetry_interval: Duration,
    pub stats_log_interval: Duration,
    pub outbox: Limits,
    /// Largest frame accepted, and the most a result or state may take when sent (or the
    /// coordinator's limit, when its `registration_ack` says a smaller one): a bigger one is not
    /// sent as it is (the attempt fails saying why; a state becomes a note of its size).
    pub max_frame: usize,
    pub checkpoint_chunk_size: usize,
    /// Seed of the jitter RNG; random when `None` (the seed in use is logged).
    pub seed: Option<u64>,
    /// A JSON-lines file of connection events and result acks (see [`crate::eventlog`]).
    pub event_log: Option<PathBuf>,
    /// The secret that signs registrations when the coordinator asks (its `welcome` carries a
    /// nonce). Never sent, never logged.
    pub secret: Option<Secret>,
    /// Refuse a coordinator whose `welcome` does not ask for per-message integrity tags
    /// (without this, tags are used exactly when the coordinator asks).
    pub require_message_mac: bool,
    /// Refusals by the coordinator (wrong secret, incompatible protocol...) on this many
    /// connections in a row, with no registration between them, stop the worker for good;
    /// fewer are retried, since a frame damaged on the wire can read as a refusal.
    pub refusals_before_stop: u32,
    /// Certificates (PEM) to trust for `wss://`; the system's roots when `None`.
    pub ca_file: Option<PathBuf>,
    /// Offer zstd compression at registration.
    pub compression: bool,
    /// Messages of at least this many bytes of JSON go compressed once agreed.
    pub compress_threshold: usize,
    /// Offer batch frames at registration: once agreed, the outbox entries sent together go
    /// in one frame.
    pub batching: bool,
    /// Offer compact acknowledgements at registration: once agreed, the coordinator may
    /// acknowledge several recorded messages in one `acks`.
    pub compact_acks: bool,
}

impl WorkerConfig {
    /// A config with every default, for the given coordinator and id.
    pub fn new(coordinator: impl Into<String>, worker_id: WorkerId) -> Self {
        Self {
            coordinator: coordinator.into(),
            worker_id,
            capabilities: Vec::new(),
            tags: BTreeMap::new(),
            slots: DEFAULT_SLOTS,
            state_dir: None,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            ws_ping_interval: DEFAULT_WS_PING_INTERVAL,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            healthy_after: DEFAULT_HEALTHY_AFTER,
            backoff: BackoffConfig::default(),
            adaptive: AdaptiveConfig::default(),
            telemetry_interval: DEFAULT_TELEMETRY_INTERVAL,
            stats_log_interval: DEFAULT_STATS_LOG_INTERVAL,
            outbox: Limits::default(),
            max_frame: DEFAULT_MAX_FRAME,
            checkpoint_chunk_size: DEFAULT_CHUNK_SIZE,
            seed: None,
            event_log: None,
            secret: None,
            require_message_mac: false,
            refusals_before_stop: DEFAULT_REFUSALS_BEFORE_STOP,
            ca_file: None,
            compression: true,
            compress_threshold: tether_proto::compress::DEFAULT_THRESHOLD,
            batching: true,
            compact_acks: true,
        }
    }
}
