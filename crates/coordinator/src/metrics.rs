//! Prometheus metrics of the coordinator. Every metric name is a constant here; label values
//! come from closed sets (message types, error codes, task and worker states, outcomes), never
//! a worker or task id.
//!
//! The recorder of the `metrics` crate is process-wide: [`install`] installs one Prometheus
//! recorder the first time it is called and hands out its handle afterwards. Counters and
//! histograms are recorded at their call sites; gauges of the model (tasks and workers by
//! state, queue depth) are set from the core's overview when `/metrics` is scraped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tether_proto::counters::ByType;
use tether_proto::msg::{COORD_MSG_TYPES, WORKER_MSG_TYPES};

use crate::core::{Api, ApiError};
use crate::server::AppState;

// Connections.
/// Counter: WebSocket sessions opened.
pub const CONNECTIONS: &str = "tether_connections_total";
/// Counter: registrations of a worker that had registered before (a reconnection).
pub const RECONNECTIONS: &str = "tether_reconnections_total";
/// Gauge: 1 when the last scrape got no overview from the core in time (its task, worker and
/// queue gauges are then from an earlier scrape), else 0.
pub const MODEL_STALE: &str = "tether_model_stale";
/// Counter: sessions ended, by `reason` ([`SessionEnd`]: closed, timeout, error, oversize,
/// invalid_utf8, integrity, coordinator).
pub const SESSIONS_ENDED: &str = "tether_sessions_ended_total";
/// Counter: sessions closed because a newer connection of the same worker arrived.
pub const SESSIONS_REPLACED: &str = "tether_sessions_replaced_total";
/// Counter: registrations refused as a replaced process's: two live processes share an id.
pub const ID_CONFLICTS: &str = "tether_worker_id_conflicts_total";
/// Counter: worker registrations refused, by `reason` ([`Refused`]), whether the session
/// refused them before the core heard of the connection (4001, 4002, 4003) or the core did.
pub const REGISTRATIONS_REFUSED: &str = "tether_registrations_refused_total";
/// Counter: checkpoints refused as larger than `max_checkpoint_bytes`.
pub const CHECKPOINTS_TOO_LARGE: &str = "tether_checkpoints_too_large_total";
/// Counter: workers past the grace period whose leases were released.
pub const WORKERS_LOST: &str = "tether_workers_lost_total";
/// Counter: leases given back to a worker that came back, past the grace period, with the
/// lost attempt finished and the task not yet started elsewhere (its result is then counted).
pub const LEASES_RESTORED: &str = "tether_leases_restored_total";
/// Gauge: known workers by `state` (connected, disconnected, lost).
pub const WORKERS: &str = "tether_workers";
pub const WORKERS_DRAINING: &str = "tether_workers_draining";
/// Histogram (s): silence after which a session was declared dead (last frame to close).
pub const DEAD_DETECT: &str = "tether_dead_connection_detect_seconds";
/// Histogram (s): from a worker's disconnect to its next registration.
pub const RECONNECT_DURATION: &str = "tether_reconnect_duration_seconds";
/// Histogram (s): heartbeat round trip as measured and reported by workers (p50 of each
/// telemetry report).
pub const HEARTBEAT_RTT: &str = "tether_heartbeat_rtt_seconds";

// Messages.
/// Counter: messages decoded from workers, by `type`.
pub const MESSAGES_IN: &str = "tether_messages_in_total";
/// Counter: messages sent to workers, by `type`.
pub const MESSAGES_OUT: &str = "tether_messages_out_total";
/// Counter: `error` messages by `code` and `direction` (sent, received).
pub const ERRORS: &str = "tether_errors_total";
/// Counter: worker frames dropped because their integrity tag did not verify.
pub const MAC_FAILURES: &str = "tether_mac_failures_total";
/// Counter: frames refused as too big.
pub const OVERSIZE_FRAMES: &str = "tether_oversize_frames_total";

// Tasks.
/// Gauge: tasks by `state`.
pub const TASKS: &str = "tether_tasks";
/// Gauge: tasks waiting for a worker, by `priority` (0 to 9, each always there; `sum()` is the
/// depth).
pub const QUEUE_DEPTH: &str = "tether_queue_depth";
/// The `priority` labels of [`QUEUE_DEPTH`], index = priority.
pub const PRIORITY_LABELS: [&str; crate::core::queue::PRIORITIES] =
    ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
/// Counter: tasks that reached a terminal state, by `status`.
pub const TASKS_FINISHED: &str = "tether_tasks_finished_total";
/// Counter: results received, by `disposition` (recorded, duplicate, stale, rejected).
pub const RESULTS: &str = "tether_results_total";
/// Counter: leases handed out.
pub const ASSIGNMENTS: &str = "tether_assignments_total";
/// Counter: tasks queued again after their lease ended without a result.
pub const REQUEUED: &str = "tether_requeued_total";
/// Counter: finished tasks removed by the retention setting.
pub const TASKS_EXPIRED: &str = "tether_tasks_expired_total";
/// Histogram (s): from a task entering the queue to its lease.
pub const DISPATCH_LATENCY: &str = "tether_dispatch_latency_seconds";
/// Histogram (s): from lease to counted result, by `outcome`.
pub const TASK_DURATION: &str = "tether_task_duration_seconds";

// Checkpoints and compression.
/// Counter: checkpoint bytes received.
pub const CHECKPOINT_BYTES: &str = "tether_checkpoint_bytes_total";
/// Counter: checkpoint bytes sent to workers that fetched them (`checkpoint_fetch`).
pub const CHECKPOINT_BYTES_SERVED: &str = "tether_checkpoint_bytes_served_total";
/// Histogram (bytes): size of each completed checkpoint.
pub const CHECKPOINT_SIZE: &str = "tether_checkpoint_size_bytes";
/// Counter: payload bytes before compression, both ways (from the core's counters).
pub const COMPRESSION_RAW_BYTES: &str = "tether_compression_raw_bytes_total";
/// Counter: payload bytes after compression, as sent or received on the wire.
pub const COMPRESSION_WIRE_BYTES: &str = "tether_compression_wire_bytes_total";
/// Gauge: raw / wire bytes since start (1 while nothing was compressed).
pub const COMPRESSION_RATIO: &str = "tether_compression_ratio";

// The core's counters.
/// Counter: every counter of the overview (`/api/v1/overview`), by `name`: registrations,
/// rejected messages, authentication failures, refused and throttled connections, slow
/// handshakes, connections over their budget before registration, frames paced by the message
/// or byte rate, ... Set from this coordinator's totals at scrape.
pub const CORE_COUNTERS: &str = "tether_counter_total";
/// Counter: HTTP connections closed for taking their answer slower than the minimum answer
/// rate (`Limits::min_answer_rate`) for about `http_idle`; those closed for moving no byte at
/// all are `idle_http_closed` of [`CORE_COUNTERS`]. Set from the core's counters at scrape.
pub const HTTP_SLOW_CLOSED: &str = "tether_http_slow_closed_total";

// Store.
/// Histogram (s): one group commit, from the start of the transaction to its end.
pub const STORE_COMMIT: &str = "tether_store_commit_seconds";
/// Counter: group commits.
pub const STORE_COMMITS: &str = "tether_store_commits_total";
/// Counter: mutations committed.
pub const STORE_MUTATIONS: &str = "tether_store_mutations_total";
/// Counter: batches of messages only that the core delivered itself, the writer having nothing
/// unfinished (`store::Handoff`).
pub const STORE_DIRECT: &str = "tether_store_direct_deliveries_total";
/// Gauge: tasks whose newest state is journaled and not yet folded into the database.
pub const STORE_UNFOLDED_STATES: &str = "tether_store_unfolded_states";
/// Gauge (bytes): the state journal's files on disk.
pub const STORE_JOURNAL_BYTES: &str = "tether_store_journal_bytes";
/// Gauge: bytes free for the coordinator in the data directory's file system.
pub const DATA_DIR_AVAILABLE: &str = "tether_data_dir_available_bytes";
/// Counter: fold rounds completed (their journal files deleted).
pub const STORE_FOLD_ROUNDS: &str = "tether_store_fold_rounds_total";
/// Counter: fold rounds that could not make or remove a journal file (each tried again a
/// second later). Set from the writer's `StoreStats::fold_failures` at scrape.
pub const STORE_FOLD_FAILURES: &str = "tether_store_fold_failures_total";
/// Gauge: 1 while a commit waits for space in the data directory (`store::space`), else 0.
pub const STORE_OUT_OF_SPACE: &str = "tether_store_out_of_space";

/// Histogram buckets for durations, in seconds: 0.5 ms to one hour.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 900.0, 3600.0,
];
/// Histogram buckets for sizes, in bytes: 1 KiB to 256 MiB.
pub const BYTES_BUCKETS: &[f64] = &[
    1024.0,
    16_384.0,
    131_072.0,
    1_048_576.0,
    8_388_608.0,
    67_108_864.0,
    268_435_456.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// [`MESSAGES_IN`] by type, made when the recorder is installed.
pub static MESSAGES_IN_BY_TYPE: ByType = ByType::new(MESSAGES_IN, WORKER_MSG_TYPES);
/// [`MESSAGES_OUT`] by type, made when the recorder is installed.
pub static MESSAGES_OUT_BY_TYPE: ByType = ByType::new(MESSAGES_OUT, COORD_MSG_TYPES);

/// Installs the process-wide Prometheus recorder once and returns its handle.
///
/// When another recorder was installed first (an embedding program's own), the handle renders
/// nothing of ours and a warning says so.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "another metrics recorder is installed; /metrics shows only what it does not record"
                );
            }
            describe();
            register();
            handle
        })
        .clone()
}

/// How a worker's session ended: the `reason` label of [`SESSIONS_ENDED`]. The session's loop
/// in `ws` ends with one of these and the label is registered at 0 for each of [`Self::ALL`],
/// so a new way to end is a variant here, not a string there that no series was made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The worker closed the connection, or it ended without a close.
    Closed,
    /// No frame from the worker for its liveness timeout.
    Timeout,
    /// A read or a write failed.
    Error,
    /// A frame, or a compressed frame once inflated, over the size limit.
    Oversize,
    /// A text frame that is not UTF-8.
    InvalidUtf8,
    /// Too many frames failed their `--message-mac` tag.
    Integrity,
    /// The coordinator closed it: replaced, refused, paced out, or the core stopping.
    Coordinator,
}

impl SessionEnd {
    /// Every way a session ends, each once.
    pub const ALL: [SessionEnd; 7] = [
        Self::Closed,
        Self::Timeout,
        Self::Error,
        Self::Oversize,
        Self::InvalidUtf8,
        Self::Integrity,
        Self::Coordinator,
    ];

    /// Its `reason` label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Timeout => "timeout",
            Self::Error => "error",
            Self::Oversize => "oversize",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::Integrity => "integrity",
            Self::Coordinator => "coordinator",
        }
    }
}

/// Why a worker's registration was refused: the `reason` label of [`REGISTRATIONS_REFUSED`],
/// registered at 0 for each of [`Self::ALL`]. Its label is also the class its log lines are
/// limited under (`ratelimit`): fixed here, never what the attempt sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its signature, or its integrity tag, did not verify (`unauthorized`, 4001); or a second
    /// registration on an authenticated session (`unauthorized`, the session kept).
    Unauthorized,
    /// Another protocol version (`incompatible_protocol`, 4002).
    IncompatibleProtocol,
    /// A frame limit under the least every peer takes (`incompatible_protocol`, 4002).
    FrameLimit,
    /// Labels, an inventory or an acknowledgement past their bounds (`bad_frame`, 4002).
    OutOfBounds,
    /// `worker_id` is not the endpoint's (4003).
    OtherWorker,
    /// A process a newer one of the same worker id replaced (4003; also
    /// [`ID_CONFLICTS`]).
    Replaced,
}

impl Refused {
    /// Every reason, each once.
    pub const ALL: [Refused; 6] = [
        Self::Unauthorized,
        Self::IncompatibleProtocol,
        Self::FrameLimit,
        Self::OutOfBounds,
        Self::OtherWorker,
        Self::Replaced,
    ];

    /// Its `reason` label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::IncompatibleProtocol => "incompatible_protocol",
            Self::FrameLimit => "frame_limit",
            Self::OutOfBounds => "out_of_bounds",
            Self::OtherWorker => "other_worker",
            Self::Replaced => "replaced",
        }
    }

    /// Counts one refusal of this reason.
    pub fn count(self) {
        metrics::counter!(REGISTRATIONS_REFUSED, "reason" => self.as_str()).increment(1);
    }
}

/// `disposition`s of [`RESULTS`]: [`disposition`]'s, `cancelled` (a stale result of an
/// attempt a cancel ended, counted apart), `adopted` (a finished result of an attempt whose
/// lease was lost, counted because the task had no counted result yet: answered `recorded`),
/// `worker_fault` (the holder could not run the attempt: the task runs again) and `retried`
/// (an end the task's `retry_on` names: the task runs again); the last two are kept, not
/// counted, and answered `recorded`.
pub const RESULT_DISPOSITIONS: &[&str] = &[
    "recorded",
    "duplicate",
    "stale",
    "cancelled",
    "adopted",
    "worker_fault",
    "retried",
    "rejected",
];
/// `direction`s of [`ERRORS`].
pub const ERROR_DIRECTIONS: &[&str] = &["sent", "received"];

/// Makes every counter and histogram family exist before its first event, counters at 0 for
/// each label value known up front (reasons, codes, statuses, dispositions), histograms empty:
/// a rule over one (`rate(tether_mac_failures_total[5m])`) reads 0, not nothing, and a series
/// that first appeared at its value (an id conflict comes as three refusals) would be no
/// increase to Prometheus, so the first episode of a process would not alert. Gauges are set
/// at each scrape or look, but [`STORE_OUT_OF_SPACE`], set only as a commit starts or stops
/// waiting for space: 0 until then.
fn register() {
    metrics::gauge!(STORE_OUT_OF_SPACE).set(0.0);
    for name in [
        CONNECTIONS,
        RECONNECTIONS,
        SESSIONS_REPLACED,
        ID_CONFLICTS,
        CHECKPOINTS_TOO_LARGE,
        WORKERS_LOST,
        LEASES_RESTORED,
        MAC_FAILURES,
        OVERSIZE_FRAMES,
        ASSIGNMENTS,
        REQUEUED,
        TASKS_EXPIRED,
        CHECKPOINT_BYTES,
        CHECKPOINT_BYTES_SERVED,
        STORE_COMMITS,
        STORE_MUTATIONS,
        STORE_DIRECT,
        STORE_FOLD_ROUNDS,
    ] {
        metrics::counter!(name).increment(0);
    }
    for end in SessionEnd::ALL {
        metrics::counter!(SESSIONS_ENDED, "reason" => end.as_str()).increment(0);
    }
    for refused in Refused::ALL {
        metrics::counter!(REGISTRATIONS_REFUSED, "reason" => refused.as_str()).increment(0);
    }
    for &d in RESULT_DISPOSITIONS {
        metrics::counter!(RESULTS, "disposition" => d).increment(0);
    }
    // `code`s of ERRORS: every error code.
    for code in tether_proto::msg::ErrorCode::ALL {
        for &direction in ERROR_DIRECTIONS {
            metrics::counter!(ERRORS, "code" => code.as_str(), "direction" => direction)
                .increment(0);
        }
    }
    let ended = tether_proto::TaskStatus::ALL
        .into_iter()
        .filter(|s| s.is_terminal());
    for status in ended {
        metrics::counter!(TASKS_FINISHED, "status" => status.as_str()).increment(0);
        // Registered: rendered with no observation.
        let _ = metrics::histogram!(TASK_DURATION, "outcome" => status.as_str());
    }
    for name in [
        DEAD_DETECT,
        RECONNECT_DURATION,
        HEARTBEAT_RTT,
        DISPATCH_LATENCY,
        CHECKPOINT_SIZE,
        STORE_COMMIT,
    ] {
        let _ = metrics::histogram!(name);
    }
    MESSAGES_IN_BY_TYPE.register();
    MESSAGES_OUT_BY_TYPE.register();
}

/// The recorder's configuration: histograms with buckets (not summaries).
pub fn builder() -> PrometheusBuilder {
    // INVARIANT: the bucket lists are non-empty constants, the only way these calls fail.
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES_BUCKETS)
        .and_then(|b| b.set_buckets(SECONDS_BUCKETS))
        .expect("bucket lists are not empty")
}

/// Records a duration in a histogram.
pub fn observe(name: &'static str, d: Duration) {
    metrics::histogram!(name).record(d.as_secs_f64());
}

/// Seconds between two wall-clock times (0 if `to` is earlier).
pub fn secs_between(from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6
}

/// The label value of a result's disposition.
pub fn disposition(d: tether_proto::msg::Disposition) -> &'static str {
    use tether_proto::msg::Disposition;
    match d {
        Disposition::Recorded => "recorded",
        Disposition::Duplicate => "duplicate",
        Disposition::Stale => "stale",
        Disposition::Rejected => "rejected",
    }
}

fn ratio(raw: u64, wire: u64) -> f64 {
    if wire == 0 {
        1.0
    } else {
        raw as f64 / wire as f64
    }
}

/// `GET /metrics`: the model's gauges from the core's overview, then everything recorded, in
/// the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "observe",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String))
)]
pub async fn scrape(State(app): State<Arc<AppState>>) -> Response {
    // First: what is set below goes to the recorder this installs, when none was yet.
    let recorder = install();
    let asked = crate::http::ask(&app, |reply| Api::Overview { reply });
    match tokio::time::timeout(OVERVIEW_WAIT, asked).await {
        Ok(Ok(overview)) => {
            for (state, n) in &overview.tasks {
                metrics::gauge!(TASKS, "state" => *state).set(*n as f64);
            }
            for (state, n) in &overview.workers {
                metrics::gauge!(WORKERS, "state" => *state).set(*n as f64);
            }
            metrics::gauge!(WORKERS_DRAINING).set(overview.workers_draining as f64);
            // By priority, as the queue keeps it; `sum()` is the depth.
            let queued = app.counters.queued.get();
            for (priority, n) in PRIORITY_LABELS.iter().zip(queued) {
                metrics::gauge!(QUEUE_DEPTH, "priority" => *priority).set(n as f64);
            }
            for (name, n) in &overview.counters {
                metrics::counter!(CORE_COUNTERS, "name" => *name).absolute(*n);
            }
            metrics::gauge!(MODEL_STALE).set(0.0);
        }
        Ok(Err(e)) if !matches!(e, ApiError::OutOfSpace) => return e.into_response(),
        // The core did not answer in time, or its answer waits for commits that wait for space
        // (and then the core itself): the rest is served, the store's gauges among them, which
        // say why; the model's gauges keep their last values, and say so.
        Ok(Err(_)) | Err(_) => {
            tracing::debug!("the core's overview did not come in time; metrics served without it");
            metrics::gauge!(MODEL_STALE).set(1.0);
        }
    }
    // From the core's counters of compressed frames, both ways, which every compressed frame
    // adds to: three lookups in the recorder's registry a frame were 1.3 % of the
    // coordinator's samples under a flood.
    let c = &app.counters;
    let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
    let raw = get(&c.compressed_in_json_bytes) + get(&c.compressed_out_json_bytes);
    let wire = get(&c.compressed_in_wire_bytes) + get(&c.compressed_out_wire_bytes);
    metrics::counter!(COMPRESSION_RAW_BYTES).absolute(raw);
    metrics::counter!(COMPRESSION_WIRE_BYTES).absolute(wire);
    metrics::gauge!(COMPRESSION_RATIO).set(ratio(raw, wire));
    // Counters kept outside the recorder, as their totals.
    metrics::counter!(HTTP_SLOW_CLOSED).absolute(get(&c.slow_http_closed));
    metrics::counter!(STORE_FOLD_FAILURES).absolute(get(&app.store_stats.fold_failures));
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], recorder.render()).into_response()
}

/// How long a scrape waits for the core's overview before it serves what it has without it.
pub const OVERVIEW_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(CONNECTIONS, "WebSocket sessions opened");
    describe_counter!(
        RECONNECTIONS,
        "registrations of a worker that had registered before"
    );
    describe_counter!(SESSIONS_ENDED, "sessions ended, by reason");
    describe_counter!(SESSIONS_REPLACED, "sessions replaced by a newer connection");
    describe_counter!(
        ID_CONFLICTS,
        "registrations refused as those of a process a newer one of the same worker id replaced"
    );
    describe_counter!(
        CHECKPOINTS_TOO_LARGE,
        "checkpoints refused as larger than the coordinator keeps"
    );
    describe_counter!(
        REGISTRATIONS_REFUSED,
        "worker registrations refused, by reason"
    );
    describe_counter!(WORKERS_LOST, "workers lost after the grace period");
    describe_counter!(
        LEASES_RESTORED,
        "leases given back to a worker that came back past the grace period with the lost attempt finished"
    );
    describe_gauge!(WORKERS, "known workers by connection state");
    describe_gauge!(
        WORKERS_DRAINING,
        "known workers an operator drained (tether drain): they take no new task"
    );
    describe_histogram!(
        DEAD_DETECT,
        Unit::Seconds,
        "silence before a dead session was closed"
    );
    describe_histogram!(
        RECONNECT_DURATION,
        Unit::Seconds,
        "disconnect to next registration"
    );
    describe_histogram!(
        HEARTBEAT_RTT,
        Unit::Seconds,
        "heartbeat round trip reported by workers (p50)"
    );
    describe_counter!(MESSAGES_IN, "messages received from workers, by type");
    describe_counter!(MESSAGES_OUT, "messages sent to workers, by type");
    describe_counter!(ERRORS, "error messages by code and direction");
    describe_counter!(OVERSIZE_FRAMES, "frames refused as too big");
    describe_counter!(
        MAC_FAILURES,
        "worker frames dropped because their integrity tag did not verify"
    );
    describe_gauge!(TASKS, "tasks by state");
    describe_gauge!(
        QUEUE_DEPTH,
        "tasks waiting for a worker, by priority (sum() for all)"
    );
    describe_gauge!(
        MODEL_STALE,
        "1 when the last scrape got no overview from the core in time (task, worker and queue gauges from an earlier one)"
    );
    describe_counter!(
        TASKS_FINISHED,
        "tasks that reached a terminal state, by status"
    );
    describe_counter!(RESULTS, "results received, by disposition");
    describe_counter!(ASSIGNMENTS, "leases handed out");
    describe_counter!(TASKS_EXPIRED, "finished tasks removed by retention");
    describe_counter!(REQUEUED, "tasks queued again after a lost lease");
    describe_histogram!(DISPATCH_LATENCY, Unit::Seconds, "queued to leased");
    describe_histogram!(
        TASK_DURATION,
        Unit::Seconds,
        "leased to counted result, by outcome"
    );
    describe_counter!(CHECKPOINT_BYTES, Unit::Bytes, "checkpoint bytes received");
    describe_counter!(
        CHECKPOINT_BYTES_SERVED,
        Unit::Bytes,
        "checkpoint bytes sent to workers that fetched them"
    );
    describe_histogram!(
        CHECKPOINT_SIZE,
        Unit::Bytes,
        "size of completed checkpoints"
    );
    describe_counter!(
        COMPRESSION_RAW_BYTES,
        Unit::Bytes,
        "payload bytes before compression"
    );
    describe_counter!(
        COMPRESSION_WIRE_BYTES,
        Unit::Bytes,
        "payload bytes after compression"
    );
    describe_gauge!(COMPRESSION_RATIO, "raw / compressed bytes since start");
    describe_counter!(
        CORE_COUNTERS,
        "the core's counters (as in /api/v1/overview), by name"
    );
    describe_histogram!(STORE_COMMIT, Unit::Seconds, "one group commit");
    describe_counter!(STORE_COMMITS, "group commits");
    describe_counter!(STORE_MUTATIONS, "mutations committed");
    describe_counter!(
        STORE_DIRECT,
        "batches of messages only delivered by the core itself, the writer having nothing unfinished"
    );
    describe_gauge!(
        STORE_UNFOLDED_STATES,
        "tasks whose newest state is journaled and not yet folded into the database"
    );
    describe_gauge!(
        STORE_JOURNAL_BYTES,
        Unit::Bytes,
        "the state journal's files on disk"
    );
    describe_counter!(
        STORE_FOLD_ROUNDS,
        "state fold rounds completed (their journal files deleted)"
    );
    describe_counter!(
        STORE_FOLD_FAILURES,
        "state fold rounds that could not make or remove a journal file (each tried again a second later)"
    );
    describe_counter!(
        HTTP_SLOW_CLOSED,
        "HTTP connections closed for taking their answer slower than the minimum answer rate"
    );
    describe_gauge!(
        STORE_OUT_OF_SPACE,
        "1 while a commit waits for space in the data directory (nothing is acknowledged, submissions are refused), else 0"
    );
    describe_gauge!(
        DATA_DIR_AVAILABLE,
        Unit::Bytes,
        "free space for the coordinator in the data directory's file system (looked at every 10 s)"
    );
}

#[cfg(test)]
mod tests {
    /// [`SessionEnd::ALL`](super::SessionEnd::ALL), whose labels are registered at 0, lists every
    /// way a session ends once, each with its own label: a variant added stops this match
    /// compiling until it is listed here, and then fails it until it is listed there.
    #[test]
    fn every_session_end_is_registered_once_under_its_own_label() {
        use super::SessionEnd as S;
        let every = |e: S| match e {
            S::Closed
            | S::Timeout
            | S::Error
            | S::Oversize
            | S::InvalidUtf8
            | S::Integrity
            | S::Coordinator => e,
        };
        let all = [
            every(S::Closed),
            every(S::Timeout),
            every(S::Error),
            every(S::Oversize),
            every(S::InvalidUtf8),
            every(S::Integrity),
            every(S::Coordinator),
        ];
        assert_eq!(S::ALL, all);
        let mut labels: Vec<&str> = S::ALL.iter().map(|e| e.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), S::ALL.len(), "a label shared: {labels:?}");
    }

    /// [`Refused::ALL`](super::Refused::ALL), whose labels are registered at 0, lists every
    /// reason once, each with its own label: a variant added stops this match compiling until
    /// it is listed here, and then fails it until it is listed there.
    #[test]
    fn every_refusal_reason_is_registered_once_under_its_own_label() {
        use super::Refused as R;
        let every = |r: R| match r {
            R::Unauthorized
            | R::IncompatibleProtocol
            | R::FrameLimit
            | R::OutOfBounds
            | R::OtherWorker
            | R::Replaced => r,
        };
        let all = [
            every(R::Unauthorized),
            every(R::IncompatibleProtocol),
            every(R::FrameLimit),
            every(R::OutOfBounds),
            every(R::OtherWorker),
            every(R::Replaced),
        ];
        assert_eq!(R::ALL, all);
        let mut labels: Vec<&str> = R::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), R::ALL.len(), "a label shared: {labels:?}");
    }
}
