//! Prometheus metrics of the worker, served on `/metrics` by [`serve`] when the worker is
//! started with `--metrics-listen`. Every metric name is a constant here; label values come
//! from closed sets (message types, error codes, states, outcomes).
//!
//! The recorder of the `metrics` crate is process-wide: [`install`] installs one Prometheus
//! recorder the first time it is called. Counters and histograms are recorded where things
//! happen; gauges of the agent's state (connection state, outbox, active tasks, adaptive
//! values) are set from an [`AgentHandle`] when `/metrics` is scraped. In a process that also
//! runs a coordinator (the demo, tests), the coordinator's recorder records these too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tether_proto::counters::ByType;
use tether_proto::msg::{COORD_MSG_TYPES, WORKER_MSG_TYPES};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::AgentHandle;
use crate::stats::ConnState;

// Connections.
/// Counter: connection attempts.
pub const CONNECTION_ATTEMPTS: &str = "tether_worker_connection_attempts_total";
/// Counter: attempts that did not end in a registered session (failed reconnections).
pub const CONNECTION_FAILURES: &str = "tether_worker_connection_failures_total";
/// Counter: registered sessions that were lost.
pub const SESSIONS_LOST: &str = "tether_worker_sessions_lost_total";
/// Counter: registrations after a lost session (successful reconnections).
pub const RECONNECTIONS: &str = "tether_worker_reconnections_total";
/// Gauge: 1 for the current connection `state`, 0 for the others.
pub const CONNECTION_STATE: &str = "tether_worker_connection_state";
/// Histogram (s): heartbeat round trip.
pub const HEARTBEAT_RTT: &str = "tether_worker_heartbeat_rtt_seconds";
/// Counter: heartbeat round trips left out of the RTT statistics and the adaptive timeout,
/// measured behind 16 KiB or more queued on the link, or unanswered when the coordinator
/// pinged (its session not reading).
pub const HEARTBEAT_RTT_LOADED: &str = "tether_worker_heartbeat_rtt_loaded_total";
/// Histogram (s): silence from the last inbound frame until the session was declared dead.
pub const DEAD_DETECT: &str = "tether_worker_dead_connection_detect_seconds";
/// Histogram (s): from losing a session to the next registration.
pub const RECONNECT_DURATION: &str = "tether_worker_reconnect_duration_seconds";
/// Gauge: the current (adaptive) heartbeat timeout, seconds.
pub const HEARTBEAT_TIMEOUT: &str = "tether_worker_heartbeat_timeout_seconds";
/// Gauge (bytes/s): the link's delivery rate to the coordinator, as last measured.
pub const SEND_RATE: &str = "tether_worker_send_bytes_per_second";
/// Counter: times outbox entries started to wait for the send window to open.
pub const SEND_WINDOW_FULL: &str = "tether_worker_send_window_full_total";
/// Gauge: connected time / total time.
pub const STABILITY: &str = "tether_worker_connection_stability";
/// Gauge: 1 while the coordinator says an operator drained this worker (no new task comes).
pub const DRAINED: &str = "tether_worker_drained";

// Messages.
/// Counter: messages decoded from the coordinator, by `type`.
pub const MESSAGES_IN: &str = "tether_worker_messages_in_total";
/// Counter: messages written to the coordinator, by `type`.
pub const MESSAGES_OUT: &str = "tether_worker_messages_out_total";
/// Counter: `error` messages by `code` and `direction` (sent, received).
pub const ERRORS: &str = "tether_worker_errors_total";
/// Counter: coordinator frames dropped because their integrity tag did not verify.
pub const MAC_FAILURES: &str = "tether_worker_mac_failures_total";
/// Counter: results acknowledged `stale`: the coordinator kept them for the record but did not
/// count them, their attempt no longer holding the lease (this worker away past its grace, or
/// the task moved on): work done for nothing.
pub const STALE_RESULTS: &str = "tether_worker_stale_results_total";
/// Counter: outbox entries too large for the coordinator's frames when about to be sent, by
/// `type` (a result becomes its attempt's failure, anything else is dropped).
pub const OVERSIZE: &str = "tether_worker_oversize_messages_total";
/// Counter: writes of the outbox journal (the state directory's `worker.db`) that failed, the
/// disk full, say: what they put would not survive a crash (a result's attempt stays recorded
/// as running until the result is journaled or acknowledged).
pub const JOURNAL_FAILURES: &str = "tether_worker_journal_write_failures_total";
/// Gauge: outbox entries waiting for an ack.
pub const OUTBOX_DEPTH: &str = "tether_worker_outbox_depth";
/// Gauge: encoded bytes in the outbox.
pub const OUTBOX_BYTES: &str = "tether_worker_outbox_bytes";

// Tasks.
/// Gauge: tasks running on this worker, by `state` (running, paused).
pub const TASKS: &str = "tether_worker_tasks";
/// Counter: executions that ended with a result, by `outcome`.
pub const TASKS_FINISHED: &str = "tether_worker_tasks_finished_total";
/// Histogram (s): one execution, by `outcome`.
pub const TASK_DURATION: &str = "tether_worker_task_duration_seconds";
/// Counter: checkpoint bytes queued for upload.
pub const CHECKPOINT_BYTES: &str = "tether_worker_checkpoint_bytes_total";
/// Counter: checkpoints not uploaded, larger than the coordinator keeps.
pub const CHECKPOINTS_TOO_LARGE: &str = "tether_worker_checkpoints_too_large_total";

// Compression.
/// Counter: payload bytes before compression (fed by the compression layer).
pub const COMPRESSION_RAW_BYTES: &str = "tether_worker_compression_raw_bytes_total";
/// Counter: payload bytes after compression.
pub const COMPRESSION_WIRE_BYTES: &str = "tether_worker_compression_wire_bytes_total";
/// Gauge: raw / wire bytes since start (1 while nothing was compressed).
pub const COMPRESSION_RATIO: &str = "tether_worker_compression_ratio";

/// Histogram buckets for durations, in seconds: 0.5 ms to one hour.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 900.0, 3600.0,
];

/// The Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// [`MESSAGES_IN`] by type, made when the recorder is installed.
pub static MESSAGES_IN_BY_TYPE: ByType = ByType::new(MESSAGES_IN, COORD_MSG_TYPES);
/// [`MESSAGES_OUT`] by type, made when the recorder is installed.
pub static MESSAGES_OUT_BY_TYPE: ByType = ByType::new(MESSAGES_OUT, WORKER_MSG_TYPES);

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            // INVARIANT: the bucket list is a non-empty constant, the only way this fails.
            let recorder = PrometheusBuilder::new()
                .set_buckets(SECONDS_BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "another metrics recorder is installed; the worker's /metrics shows only what it does not record"
                );
            }
            describe();
            register();
            MESSAGES_IN_BY_TYPE.register();
            MESSAGES_OUT_BY_TYPE.register();
            handle
        })
        .clone()
}

/// `direction`s of [`ERRORS`].
const ERROR_DIRECTIONS: [&str; 2] = ["sent", "received"];

/// Makes every counter and histogram family exist before its first event, counters at 0 for
/// each label value known up front, histograms empty, as the coordinator does: Prometheus
/// reads a series born at 1 as no increase, so an alert on the first failures of a worker
/// (`rate(tether_worker_connection_failures_total[5m])`) would not fire.
fn register() {
    for name in [
        CONNECTION_ATTEMPTS,
        CONNECTION_FAILURES,
        SESSIONS_LOST,
        RECONNECTIONS,
        HEARTBEAT_RTT_LOADED,
        SEND_WINDOW_FULL,
        MAC_FAILURES,
        STALE_RESULTS,
        JOURNAL_FAILURES,
        CHECKPOINT_BYTES,
        CHECKPOINTS_TOO_LARGE,
        COMPRESSION_RAW_BYTES,
        COMPRESSION_WIRE_BYTES,
    ] {
        metrics::counter!(name).increment(0);
    }
    for code in tether_proto::msg::ErrorCode::ALL {
        for direction in ERROR_DIRECTIONS {
            metrics::counter!(ERRORS, "code" => code.as_str(), "direction" => direction)
                .increment(0);
        }
    }
    for &ty in WORKER_MSG_TYPES {
        metrics::counter!(OVERSIZE, "type" => ty).increment(0);
    }
    // The `outcome`s of an execution: the terminal statuses.
    let ended = tether_proto::TaskStatus::ALL
        .into_iter()
        .filter(|s| s.is_terminal())
        .map(|s| s.as_str());
    for outcome in ended {
        metrics::counter!(TASKS_FINISHED, "outcome" => outcome).increment(0);
        // Registered: rendered with no observation.
        let _ = metrics::histogram!(TASK_DURATION, "outcome" => outcome);
    }
    for name in [HEARTBEAT_RTT, DEAD_DETECT, RECONNECT_DURATION] {
        let _ = metrics::histogram!(name);
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(CONNECTION_ATTEMPTS, "connection attempts");
    describe_counter!(
        CONNECTION_FAILURES,
        "attempts that did not end in a registered session"
    );
    describe_counter!(SESSIONS_LOST, "registered sessions that were lost");
    describe_counter!(RECONNECTIONS, "registrations after a lost session");
    describe_gauge!(CONNECTION_STATE, "1 for the current connection state");
    describe_histogram!(HEARTBEAT_RTT, Unit::Seconds, "heartbeat round trip");
    describe_counter!(
        HEARTBEAT_RTT_LOADED,
        "heartbeat round trips left out of the RTT statistics: measured behind 16 KiB or more queued on the link"
    );
    describe_counter!(
        SEND_WINDOW_FULL,
        "times outbox entries started to wait for the send window (about a second of the link) to open"
    );
    describe_histogram!(
        DEAD_DETECT,
        Unit::Seconds,
        "silence before a session was declared dead"
    );
    describe_histogram!(
        RECONNECT_DURATION,
        Unit::Seconds,
        "lost session to next registration"
    );
    describe_gauge!(
        HEARTBEAT_TIMEOUT,
        Unit::Seconds,
        "current adaptive liveness timeout"
    );
    describe_gauge!(
        SEND_RATE,
        "bytes a second: the link's delivery rate to the coordinator, measured from acknowledgements (0 before a measure)"
    );
    describe_gauge!(STABILITY, "connected time / total time");
    describe_gauge!(
        DRAINED,
        "1 while the coordinator says an operator drained this worker (no new task comes)"
    );
    describe_counter!(MESSAGES_IN, "messages from the coordinator, by type");
    describe_counter!(MESSAGES_OUT, "messages to the coordinator, by type");
    describe_counter!(ERRORS, "error messages by code and direction");
    describe_counter!(
        MAC_FAILURES,
        "coordinator frames dropped because their integrity tag did not verify"
    );
    describe_counter!(
        STALE_RESULTS,
        "results acknowledged stale: kept by the coordinator, not counted (their lease was lost)"
    );
    describe_counter!(
        OVERSIZE,
        "outbox entries too large for the coordinator's frames: results failed, the rest dropped"
    );
    describe_counter!(
        JOURNAL_FAILURES,
        "outbox journal writes that failed (the disk full, say): what they put would not survive a crash"
    );
    describe_gauge!(OUTBOX_DEPTH, "outbox entries waiting for an ack");
    describe_gauge!(OUTBOX_BYTES, Unit::Bytes, "encoded bytes in the outbox");
    describe_gauge!(TASKS, "tasks on this worker, by state");
    describe_counter!(
        TASKS_FINISHED,
        "executions that ended with a result, by outcome"
    );
    describe_histogram!(TASK_DURATION, Unit::Seconds, "one execution, by outcome");
    describe_counter!(
        CHECKPOINT_BYTES,
        Unit::Bytes,
        "checkpoint bytes queued for upload"
    );
    describe_counter!(
        CHECKPOINTS_TOO_LARGE,
        "checkpoints not uploaded, larger than the coordinator keeps"
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
}

/// Records a duration in a histogram.
pub fn observe(name: &'static str, d: Duration) {
    metrics::histogram!(name).record(d.as_secs_f64());
}

/// Records a duration in a histogram labelled with an `outcome`.
pub fn observe_labeled(name: &'static str, outcome: &'static str, d: Duration) {
    metrics::histogram!(name, "outcome" => outcome).record(d.as_secs_f64());
}

static RAW_BYTES: AtomicU64 = AtomicU64::new(0);
static WIRE_BYTES: AtomicU64 = AtomicU64::new(0);

/// Records one compressed (or decompressed) payload: `raw` bytes before compression, `wire`
/// bytes on the wire. The compression layer calls this once a frame, so it only adds to two
/// atomics; [`render`] sets the counters and the ratio gauge from them (a `counter!` here
/// built its key each frame: 1.4 % of a flooding fleet's CPU).
pub fn record_compression(raw: u64, wire: u64) {
    RAW_BYTES.fetch_add(raw, Ordering::Relaxed);
    WIRE_BYTES.fetch_add(wire, Ordering::Relaxed);
}

/// Sets the gauges of `agent` and renders everything recorded.
pub fn render(agent: &AgentHandle) -> String {
    // Installed before the gauges are set: set first, the first scrape's went nowhere.
    let handle = install();
    let state = agent.state();
    for s in [
        ConnState::Connecting,
        ConnState::Connected,
        ConnState::Disconnected,
        ConnState::Failed,
        ConnState::Shutdown,
    ] {
        metrics::gauge!(CONNECTION_STATE, "state" => s.as_str())
            .set(f64::from(u8::from(s == state)));
    }
    let stats = agent.stats();
    metrics::gauge!(STABILITY).set(stats.stability);
    metrics::gauge!(DRAINED).set(f64::from(u8::from(agent.drained())));
    metrics::gauge!(HEARTBEAT_TIMEOUT).set(stats.heartbeat_timeout_ms as f64 / 1e3);
    metrics::gauge!(SEND_RATE).set(stats.send_bytes_per_sec as f64);
    metrics::gauge!(OUTBOX_DEPTH).set(agent.outbox.len() as f64);
    metrics::gauge!(OUTBOX_BYTES).set(agent.outbox.bytes() as f64);
    let active = agent.active_tasks();
    let paused = active.iter().filter(|t| t.paused).count();
    metrics::gauge!(TASKS, "state" => "running").set((active.len() - paused) as f64);
    metrics::gauge!(TASKS, "state" => "paused").set(paused as f64);
    let (raw, wire) = (
        RAW_BYTES.load(Ordering::Relaxed),
        WIRE_BYTES.load(Ordering::Relaxed),
    );
    metrics::counter!(COMPRESSION_RAW_BYTES).absolute(raw);
    metrics::counter!(COMPRESSION_WIRE_BYTES).absolute(wire);
    metrics::gauge!(COMPRESSION_RATIO).set(if wire == 0 {
        1.0
    } else {
        raw as f64 / wire as f64
    });
    handle.render()
}

/// Why the metrics endpoint stopped.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint: {0}")]
pub struct ServeError(#[from] std::io::Error);

/// Serves `GET /metrics` for `agent` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    agent: AgentHandle,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    install();
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Arc::new(agent));
    tracing::info!(addr = %listener.local_addr()?, "worker metrics listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

async fn scrape(State(agent): State<Arc<AgentHandle>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&agent))
}

#[cfg(test)]
mod tests {
    /// Every family the worker's table in OPERATIONS.md documents is in a fresh worker's
    /// scrape, before any event: counters at 0, histograms empty. Alerts on a first failure
    /// (`rate(tether_worker_connection_failures_total[5m])`) read a series from the start.
    #[tokio::test]
    async fn a_fresh_workers_scrape_has_every_documented_family() {
        let doc = include_str!("../../../docs/OPERATIONS.md");
        let table = doc
            .split("### Worker (`--metrics-listen`)")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("the worker's metrics table");
        let documented: Vec<&str> = table
            .split('`')
            .filter(|t| t.starts_with("tether_worker_") && !t.ends_with('*'))
            .collect();
        assert!(documented.len() > 20, "{documented:?}");
        let cfg = crate::WorkerConfig::new(
            "ws://127.0.0.1:1",
            tether_proto::WorkerId::parse("fresh").expect("id"),
        );
        let agent = crate::Agent::with_transport(
            cfg,
            crate::Executors::builtin(),
            crate::connector::TcpConnector::default(),
        )
        .expect("an agent");
        let scraped = super::render(&agent.handle());
        let missing: Vec<&str> = documented
            .iter()
            .copied()
            .filter(|name| !scraped.contains(&format!("# TYPE {name} ")))
            .collect();
        assert!(
            missing.is_empty(),
            "absent from a fresh scrape: {missing:?}"
        );
        for name in [super::CONNECTION_FAILURES, super::STALE_RESULTS] {
            assert!(scraped.contains(&format!("\n{name} 0\n")), "{name} at 0");
        }
    }
}
