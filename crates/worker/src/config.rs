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
/// How long a worker told to stop while disconnected tries to reach the coordinator to hand
/// back what it holds ([`WorkerConfig::stop_reconnect`]).
pub const DEFAULT_STOP_RECONNECT: Duration = Duration::from_secs(10);
pub const DEFAULT_TELEMETRY_INTERVAL: Duration = Duration::from_secs(30);
/// Default statistics log period.
pub const DEFAULT_STATS_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Default largest frame accepted.
pub const DEFAULT_MAX_FRAME: usize = tether_proto::codec::DEFAULT_MAX_FRAME;
/// Default number of concurrent tasks.
pub const DEFAULT_SLOTS: u32 = 1;
/// Coordinator refusals in a row after which a worker stops for good.
pub const DEFAULT_REFUSALS_BEFORE_STOP: u32 = 3;
/// Default bound of the event log's file before it is rotated (64 MiB: months of records of a
/// busy worker; the rotated file kept beside it doubles what the log may take).
pub const DEFAULT_EVENT_LOG_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Smallest bound of the event log's file (64 KiB, a few hundred records): below it a rotation
/// every few records would keep too little to read a run from.
pub const MIN_EVENT_LOG_MAX_BYTES: u64 = 64 * 1024;

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
    /// The event log's file is rotated before a record would take it past this many bytes
    /// (renamed to `FILE.1`, replacing the one there; see [`crate::eventlog`]); at least
    /// [`MIN_EVENT_LOG_MAX_BYTES`].
    pub event_log_max_bytes: u64,
    /// The secret that signs registrations when the coordinator asks (its `welcome` carries a
    /// nonce). Never sent, never logged.
    pub secret: Option<Secret>,
    /// Refuse a coordinator whose `welcome` does not ask for per-message integrity tags
    /// (without this, tags are used exactly when the coordinator asks).
    pub require_message_mac: bool,
    /// Refusals by the coordinator (HTTP 401 or 403 at the upgrade, a certificate not trusted,
    /// a wrong secret, an incompatible protocol...) on this many connections in a row, with no
    /// registration between them, stop the worker for good; fewer are retried with backoff,
    /// since a frame damaged on the wire, a proxy's hiccup or a forgery can read as a refusal.
    pub refusals_before_stop: u32,
    /// Told to stop while not connected, and holding something to hand back (a running task,
    /// a result not acknowledged), the worker keeps trying to reach the coordinator this long
    /// to stop properly (its tasks handed on at once, not after the coordinator's grace
    /// period); then it stops all the same.
    pub stop_reconnect: Duration,
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
    /// Refuses settings no run can work with (building an agent calls it): a heartbeat
    /// interval under [`MIN_HEARTBEAT_INTERVAL`] or a timeout not longer than it, a first
    /// reconnect delay under [`crate::backoff::MIN_INITIAL`] (a tight reconnect loop) or a cap
    /// below it, giving up after 0 attempts, no slots, frames too small for a message's
    /// envelope, an event log bound under [`MIN_EVENT_LOG_MAX_BYTES`].
    pub fn validate(&self) -> Result<(), tether_proto::settings::ConfigError> {
        use tether_proto::settings::{ConfigError, check_frame, check_heartbeat};
        check_heartbeat(
            self.heartbeat_interval,
            self.heartbeat_timeout,
            MIN_HEARTBEAT_INTERVAL,
        )?;
        check_frame(self.max_frame)?;
        let b = &self.backoff;
        let min = crate::backoff::MIN_INITIAL;
        if b.initial < min {
            return Err(ConfigError::new(
                "backoff.initial",
                format!(
                    "{:?} is too short: at least {min:?} (a worker would retry in a tight loop)",
                    b.initial
                ),
            ));
        }
        if b.max < b.initial {
            return Err(ConfigError::new(
                "backoff.max",
                format!(
                    "{:?} is shorter than backoff.initial {:?}",
                    b.max, b.initial
                ),
            ));
        }
        if b.max_attempts == Some(0) {
            return Err(ConfigError::new(
                "backoff.max_attempts",
                "0 gives up before the first attempt: at least 1, or none to retry for ever",
            ));
        }
        if self.capabilities.iter().any(|c| c.trim().is_empty()) {
            return Err(ConfigError::new(
                "capabilities",
                "an empty capability names nothing a task could require",
            ));
        }
        if self.slots == 0 {
            return Err(ConfigError::new("slots", "0 runs nothing: at least 1"));
        }
        if self.event_log_max_bytes < MIN_EVENT_LOG_MAX_BYTES {
            return Err(ConfigError::new(
                "event_log_max_bytes",
                format!(
                    "{} bytes is too small: at least {MIN_EVENT_LOG_MAX_BYTES} (64 KiB); a log rotated every few records keeps too little to read",
                    self.event_log_max_bytes
                ),
            ));
        }
        // The coordinator refuses a registration past these (`Registration::label_problem`).
        let labels = tether_proto::msg::worker_labels_problem(&self.capabilities, &self.tags, &[]);
        if let Some((field, why)) = labels {
            return Err(ConfigError::new(field, why));
        }
        // As a submission's: a key a task could not name (`tether submit --tag KEY=VALUE`).
        if self
            .tags
            .keys()
            .any(|k| k.trim().is_empty() || k.contains('='))
        {
            return Err(ConfigError::new(
                "tags",
                "a tag's key must not be empty nor hold `=`: no task could require it",
            ));
        }
        Ok(())
    }

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
            event_log_max_bytes: DEFAULT_EVENT_LOG_MAX_BYTES,
            secret: None,
            require_message_mac: false,
            refusals_before_stop: DEFAULT_REFUSALS_BEFORE_STOP,
            stop_reconnect: DEFAULT_STOP_RECONNECT,
            ca_file: None,
            compression: true,
            compress_threshold: tether_proto::compress::DEFAULT_THRESHOLD,
            batching: true,
            compact_acks: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each setting no run can work with is refused by its field name; the defaults and the
    /// least of each pass.
    #[test]
    fn settings_that_would_stop_the_work_are_refused_by_name() {
        let base = || WorkerConfig::new("ws://127.0.0.1:1", WorkerId::parse("w").expect("id"));
        base().validate().expect("the defaults");
        type Spoil = fn(&mut WorkerConfig);
        let cases: [(&str, Spoil); 17] = [
            ("heartbeat_interval", |c| {
                c.heartbeat_interval = Duration::ZERO
            }),
            ("heartbeat_timeout", |c| {
                c.heartbeat_timeout = c.heartbeat_interval
            }),
            ("max_frame", |c| c.max_frame = 1024),
            ("backoff.initial", |c| c.backoff.initial = Duration::ZERO),
            ("backoff.max", |c| c.backoff.max = c.backoff.initial / 2),
            ("backoff.max_attempts", |c| c.backoff.max_attempts = Some(0)),
            ("slots", |c| c.slots = 0),
            ("event_log_max_bytes", |c| c.event_log_max_bytes = 0),
            ("event_log_max_bytes", |c| {
                c.event_log_max_bytes = MIN_EVENT_LOG_MAX_BYTES - 1
            }),
            ("capabilities", |c| {
                c.capabilities = vec!["cpu".into(), String::new()]
            }),
            ("capabilities", |c| c.capabilities = vec![" ".into()]),
            ("capabilities", |c| {
                c.capabilities = (0..=tether_proto::msg::MAX_WORKER_LABELS)
                    .map(|i| format!("c{i}"))
                    .collect()
            }),
            ("capabilities", |c| c.capabilities = vec!["c".repeat(257)]),
            ("tags", |c| {
                c.tags = (0..=64).map(|i| (format!("k{i}"), "v".into())).collect()
            }),
            ("tags", |c| {
                c.tags.insert("k".into(), "v".repeat(257));
            }),
            ("tags", |c| {
                c.tags.insert(String::new(), "x".into());
            }),
            ("tags", |c| {
                c.tags.insert("a=b".into(), "c".into());
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
        least.backoff.initial = crate::backoff::MIN_INITIAL;
        least.backoff.max = crate::backoff::MIN_INITIAL;
        least.backoff.max_attempts = Some(1);
        least.event_log_max_bytes = MIN_EVENT_LOG_MAX_BYTES;
        least.validate().expect("the least of each");
        // An agent is not built on a refused configuration.
        let mut c = base();
        c.slots = 0;
        let e = crate::Agent::new(c, crate::Executors::builtin()).expect_err("refused");
        assert!(e.to_string().contains("slots"), "{e}");
    }
}
