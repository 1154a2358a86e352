//! A worker through a long outage and a damaging link: its backoff while it holds leased work,
//! results kept stale, frames dropped as damaged, welcomes it cannot verify, and a coordinator
//! certificate it does not trust.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use tether_proto::encode;
use tether_proto::msg::{CoordMsg, Welcome};
use tether_worker::connector::{ConnectError, Connector, WsStream};
use tether_worker::{AgentError, ConnState, WorkerConfig};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::fake::{FakeConnector, ONE_STEP, Running, Script};

/// The coordinator's grace the fake's `registration_ack`s state (its `--lost-after`).
const GRACE_MS: u64 = 60_000;

fn config() -> WorkerConfig {
    let mut c = crate::fake::steady_config();
    c.connect_timeout = Duration::from_secs(10);
    c
}

fn gaps(attempts: &[Instant]) -> Vec<u64> {
    attempts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect()
}

/// Polls `cond` every 100 ms until it holds or `limit` passes (virtual time); whether it held.
async fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// A worker running a task the coordinator leased to it loses its path for two and a half
/// minutes (a blackhole: every attempt swallowed until its connect timeout). Its delays would
/// have grown to the 60 s cap (and each a connect timeout later), bringing it back up to 70 s
/// after the path healed: past a 60 s grace, its task lost. Told the grace, it keeps each
/// delay within a quarter of it, so it is back within 15 s of the heal.
#[tokio::test(start_paused = true)]
async fn a_worker_holding_leased_work_is_back_within_a_quarter_of_the_grace_after_a_long_blackhole()
{
    let fake = FakeConnector::new(Script::ReassignThenSilence);
    fake.set_lost_after(Some(GRACE_MS));
    let running = Running::start(&fake, config());
    running.wait_state(|s| s == ConnState::Connected).await;
    assert!(
        within(Duration::from_secs(10), || !running
            .handle
            .active_tasks()
            .is_empty())
        .await,
        "the leased task runs"
    );
    fake.set(Script::Unanswered);
    running.wait_state(|s| s != ConnState::Connected).await;
    tokio::time::sleep(Duration::from_secs(150)).await;
    let outage = fake.attempts().len();
    assert!(outage >= 8, "attempts went on through the outage: {outage}");
    fake.set(Script::Healthy);
    let healed = Instant::now();
    running.wait_state(|s| s == ConnState::Connected).await;
    let back = healed.elapsed();
    assert!(
        back <= Duration::from_millis(GRACE_MS / 4),
        "back {back:?} after the heal; attempts {:?}",
        gaps(&fake.attempts())
    );
    // No delay of the outage went past a quarter of the grace (the first attempt's gap is the
    // session: its liveness timeout).
    let g = gaps(&fake.attempts()[1..]);
    assert!(g.iter().all(|&ms| ms <= GRACE_MS / 4), "{g:?}");
    assert_eq!(running.handle.active_tasks().len(), 1, "still running");
    running.stop().await;
}

/// A worker holding nothing keeps its configured backoff whatever the coordinator's grace (a
/// herd of idle workers must not storm a coordinator that comes back): its delays grow to the
/// 60 s cap. And on a silent path, an attempt that times out before its delay ran out leaves
/// the next due a delay after it started: no gap is a connect timeout plus a delay (70 s).
#[tokio::test(start_paused = true)]
async fn an_idle_worker_keeps_its_configured_backoff_whatever_the_grace() {
    let fake = FakeConnector::new(Script::RegisterThenSilence);
    fake.set_lost_after(Some(GRACE_MS));
    let running = Running::start(&fake, config());
    running.wait_state(|s| s == ConnState::Connected).await;
    fake.set(Script::Unanswered);
    running.wait_state(|s| s != ConnState::Connected).await;
    tokio::time::sleep(Duration::from_secs(400)).await;
    let g = gaps(&fake.attempts()[1..]);
    let longest = g.iter().copied().max().unwrap_or(0);
    assert_eq!(longest, 60_000, "grown to the configured cap: {g:?}");
    assert!(
        g.iter().filter(|&&ms| ms == 60_000).count() >= 2,
        "paced a delay apart at the cap: {g:?}"
    );
    running.stop().await;
}

/// Counts `tether_worker_stale_results_total`.
#[derive(Default)]
struct StaleCount(Arc<AtomicU64>);

impl metrics::Recorder for StaleCount {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() == tether_worker::metrics::STALE_RESULTS {
            Counter::from_arc(self.0.clone())
        } else {
            Counter::noop()
        }
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// What the worker logs, for the thread of a paused test (which runs the agent).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }

    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let log = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || log.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }
}

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A result the coordinator keeps but does not count (`stale`: its attempt lost the lease) is
/// work done for nothing: the worker says so at WARN, naming the task, the attempt and why
/// (the coordinator's reason, or without one the usual why), and counts it.
#[tokio::test(start_paused = true)]
async fn a_result_acknowledged_stale_is_said_at_warn_naming_the_task_and_why_and_counted() {
    const REASON: &str = "attempt 1 no longer counts: the task was cancelled; it ended cancelled";
    for (reason, why) in [
        (Some(REASON), REASON),
        (None, "no longer holds the task's lease"),
    ] {
        let stale = StaleCount::default();
        let counted = stale.0.clone();
        let _recorder = metrics::set_default_local_recorder(&stale);
        let log = Log::default();
        let _log = log.capture();
        let fake = FakeConnector::new(Script::StaleResults { reason });
        let running = Running::start(&fake, config());
        running.wait_state(|s| s == ConnState::Connected).await;
        assert!(
            within(Duration::from_secs(30), || counted.load(Ordering::SeqCst)
                == 1)
            .await,
            "counted once: {}",
            counted.load(Ordering::SeqCst)
        );
        let said = log.text();
        let line = said
            .lines()
            .find(|l| l.contains("not counted (stale)"))
            .unwrap_or_else(|| panic!("no stale line in {said}"));
        assert!(
            line.contains("WARN")
                && line.contains(&format!("task={ONE_STEP}"))
                && line.contains("attempt=1")
                && line.contains(why),
            "{reason:?}: {line}"
        );
        running.stop().await;
    }
}

/// The coordinator's heartbeat replies say whether an operator drained the worker: it keeps
/// their word (`AgentHandle::drained`, the gauge's) and says each change once in its log.
#[tokio::test(start_paused = true)]
async fn a_drain_the_heartbeat_replies_say_is_kept_and_said_once_at_each_change() {
    let log = Log::default();
    let _log = log.capture();
    let fake = FakeConnector::new(Script::Drained { beats: 5 });
    let running = Running::start(&fake, config());
    running.wait_state(|s| s == ConnState::Connected).await;
    let drained = || running.handle.drained();
    crate::fake::until("told drained", Duration::from_secs(30), drained).await;
    crate::fake::until("told undrained", Duration::from_secs(30), || !drained()).await;
    let said = log.text();
    assert_eq!(said.matches("drained by an operator").count(), 1, "{said}");
    assert_eq!(
        said.matches("undrained: the coordinator").count(),
        1,
        "{said}"
    );
    running.stop().await;
}

/// A result whose frame the coordinator dropped as damaged (`bad_frame`, no `seq` read) is
/// sent again at once, in the same session, not after the ack deadline (a liveness timeout
/// of waiting, then a new session).
#[tokio::test(start_paused = true)]
async fn a_frame_dropped_as_damaged_is_sent_again_at_once_in_the_same_session() {
    damaged_result_is_sent_again(false, Duration::from_millis(100)).await;
}

/// One the coordinator read the `seq` of, and answered `bad_frame` naming it: no ack follows
/// (a refusal would have come with the error), so it is sent again at the next tick of the
/// session's duties, within a heartbeat interval.
#[tokio::test(start_paused = true)]
async fn a_frame_named_in_a_bad_frame_and_left_unanswered_is_sent_again_within_a_heartbeat() {
    damaged_result_is_sent_again(true, Duration::from_secs(5)).await;
}

async fn damaged_result_is_sent_again(named: bool, within_at_most: Duration) {
    let fake = FakeConnector::new(Script::DamagedResult { named });
    let cfg = config();
    let timeout = cfg.heartbeat_timeout;
    let running = Running::start(&fake, cfg);
    running.wait_state(|s| s == ConnState::Connected).await;
    let outbox = running.handle.outbox.clone();
    assert!(
        within(Duration::from_secs(60), || fake
            .result_times
            .lock()
            .expect("lock")
            .len()
            == 2
            && outbox.is_empty())
        .await,
        "the result came again and was acknowledged"
    );
    let damaged = fake
        .damaged_at
        .lock()
        .expect("lock")
        .expect("answered bad_frame");
    let again = fake.result_times.lock().expect("lock")[1];
    let after = again - damaged;
    assert!(
        after <= within_at_most && after < timeout,
        "sent again {after:?} after the bad_frame"
    );
    assert_eq!(fake.attempts().len(), 1, "in the same session");
    running.stop().await;
}

/// A coordinator certificate this worker does not trust (its CA changed) is a
/// misconfiguration the operator fixes on the coordinator or in the CA file: the worker keeps
/// trying with backoff, never taking it as the coordinator's refusal, and registers once the
/// certificate is trusted.
#[tokio::test(start_paused = true)]
async fn an_untrusted_certificate_is_retried_with_backoff_and_never_stops_the_worker() {
    let fake = FakeConnector::new(Script::Untrusted);
    let cfg = config();
    let stop_after = cfg.refusals_before_stop as usize;
    let running = Running::start(&fake, cfg);
    assert!(
        within(Duration::from_secs(120), || fake.attempts().len()
            > stop_after + 2)
        .await,
        "attempts went on"
    );
    assert_ne!(running.handle.state(), ConnState::Failed);
    assert_eq!(
        gaps(&fake.attempts())[..3],
        [1_000, 2_000, 4_000],
        "backed off"
    );
    fake.set(Script::Healthy);
    running.wait_state(|s| s == ConnState::Connected).await;
    running.stop().await;
}

/// Sends a welcome asking for an integrity the worker does not know, as a welcome damaged on
/// the wire reads (`"hmac-sha256"` with a flipped byte); counts the connections.
#[derive(Clone, Default)]
struct DamagedWelcome {
    connections: Arc<AtomicUsize>,
}

impl Connector for DamagedWelcome {
    fn connect(
        &self,
        url: String,
        config: WebSocketConfig,
    ) -> BoxFuture<'static, Result<WsStream, ConnectError>> {
        self.connections.fetch_add(1, Ordering::SeqCst);
        crate::fake::piped(url, config, |io| async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(io).await else {
                return;
            };
            let CoordMsg::Welcome(w) = crate::fake::welcome(1, 5000, 15000) else {
                return;
            };
            let damaged = CoordMsg::Welcome(Welcome {
                nonce: Some("ab".repeat(32)),
                integrity: Some("hiac-sha256".into()),
                ..w
            });
            if ws.send(Message::text(encode(&damaged))).await.is_err() {
                return;
            }
            while let Some(Ok(_)) = ws.next().await {}
        })
    }
}

fn with_secret(require_message_mac: bool) -> WorkerConfig {
    let mut c = config();
    c.secret =
        Some(tether_proto::auth::Secret::new(b"the fleet's secret, long enough").expect("secret"));
    c.require_message_mac = require_message_mac;
    c
}

/// A worker that requires integrity (`--message-mac`) cannot verify a welcome (none carries a
/// tag): one damaged on the wire is a failed attempt, retried with backoff, never a refusal,
/// so a corrupting link cannot stop it for good. Without the requirement, the same welcome
/// still counts as a refusal (three stop the worker): the difference is the requirement's.
#[tokio::test(start_paused = true)]
async fn a_damaged_welcome_never_stops_a_worker_that_requires_integrity() {
    let coordinator = DamagedWelcome::default();
    let running = Running::start_with(coordinator.clone(), with_secret(true));
    assert!(
        within(Duration::from_secs(300), || coordinator
            .connections
            .load(Ordering::SeqCst)
            >= 6)
        .await,
        "attempts went on"
    );
    assert_ne!(running.handle.state(), ConnState::Failed);
    assert!(!running.is_finished(), "the worker did not stop");
    running.stop().await;

    let coordinator = DamagedWelcome::default();
    let r = Running::start_with(coordinator.clone(), with_secret(false))
        .ended()
        .await;
    assert!(matches!(r, Err(AgentError::Refused(_))), "{r:?}");
    assert_eq!(coordinator.connections.load(Ordering::SeqCst), 3);
}
