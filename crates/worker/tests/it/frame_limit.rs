//! What the coordinator says of its limits, held to: its frame limit against messages queued
//! before it said it, and its heartbeat cadence within sane bounds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};

use tether_proto::msg::{TaskResult, TaskState, WorkerMsg, now};
use tether_proto::{Attempt, Outcome, Seq, TaskId, WorkerId};
use tether_worker::outbox::{Class, Journal, Put};
use tether_worker::statedir::StateDir;
use tether_worker::{ConnState, WorkerConfig};

use crate::fake::{FakeConnector, Running, SMALL_FRAME, Script};

fn config() -> WorkerConfig {
    crate::fake::steady_config()
}

/// Journals in the state directory `dir` (worker `w`) the upload of a checkpoint of `task`,
/// attempt 1, as a worker that had not sent it yet left it: its announcement (seq 1) and
/// `pieces` pieces of `bytes` bytes each (seq 2 on).
fn journal_checkpoint(
    dir: &std::path::Path,
    task: &TaskId,
    checkpoint: &tether_proto::CheckpointId,
    pieces: u32,
    bytes: usize,
) {
    let (sd, _) = StateDir::open(dir, &WorkerId::parse("w").expect("id")).expect("open");
    let announce = WorkerMsg::Checkpoint(tether_proto::msg::Checkpoint {
        seq: Seq(1),
        task_id: task.clone(),
        attempt: Attempt(1),
        checkpoint_id: checkpoint.clone(),
        size: u64::from(pieces) * bytes as u64,
        chunks: pieces,
        timestamp: now(),
    });
    sd.write(Some(Put::new(Class::State, Seq(1), &announce)), &[])
        .expect("write");
    for chunk in 0..pieces {
        let seq = Seq(2 + u64::from(chunk));
        let piece = WorkerMsg::CheckpointData(tether_proto::msg::CheckpointData {
            seq,
            task_id: task.clone(),
            attempt: Attempt(1),
            checkpoint_id: checkpoint.clone(),
            chunk,
            data: tether_proto::task::Blob(vec![7; bytes]),
            timestamp: now(),
        });
        sd.write(Some(Put::new(Class::State, seq, &piece)), &[])
            .expect("write");
    }
}

/// A worker on the state directory `dir`, its connections going to a fake coordinator that
/// follows `script`, once its first session is up.
async fn connected_on(dir: &std::path::Path, script: Script) -> (FakeConnector, Running) {
    let fake = FakeConnector::new(script);
    let mut cfg = config();
    cfg.state_dir = Some(dir.to_owned());
    let running = Running::start(&fake, cfg);
    running.wait_state(|s| s == ConnState::Connected).await;
    (fake, running)
}

/// Polls `cond` every 100 ms until it holds or `limit` passes (virtual time); whether it held.
async fn held_within(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let polled = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(limit, polled).await.is_ok()
}

/// Counts `tether_worker_messages_out_total` by its `type` label.
#[derive(Default)]
struct MessagesOut(std::sync::Mutex<std::collections::HashMap<String, Arc<AtomicU64>>>);

impl MessagesOut {
    fn of(&self, ty: &str) -> u64 {
        let counts = self.0.lock().expect("lock");
        counts.get(ty).map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

impl metrics::Recorder for MessagesOut {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() != tether_worker::metrics::MESSAGES_OUT {
            return Counter::noop();
        }
        let ty = key
            .labels()
            .find(|l| l.key() == "type")
            .map(|l| l.value().to_owned())
            .unwrap_or_default();
        let mut counts = self.0.lock().expect("lock");
        Counter::from_arc(counts.entry(ty).or_default().clone())
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn result(seq: u64, task: &str, pad: usize) -> WorkerMsg {
    WorkerMsg::TaskResult(TaskResult {
        seq: Seq(seq),
        task_id: TaskId::parse(task).expect("id"),
        attempt: Attempt(1),
        outcome: Outcome::Completed,
        result: serde_json::json!({ "pad": "r".repeat(pad) }).into(),
        error: None,
        worker_fault: false,
        started_at: now(),
        finished_at: now(),
        duration_ms: 5,
        timestamp: now(),
    })
}

/// A result and a state journaled by a worker whose coordinator took larger frames than the
/// one it now talks to (restarted with a smaller `--max-frame`): sent as they are, each would
/// end the session at the coordinator's limit, and every session after it. The result goes as
/// the failure of its attempt, saying why; the state is dropped; the session lives on, and
/// the small result journaled behind them arrives too. Only what was sent counts as sent.
#[tokio::test(start_paused = true)]
async fn a_journaled_result_too_large_for_the_coordinator_fails_its_attempt_and_the_session_lives_on()
 {
    // This runtime's one thread runs the session: its counts reach this recorder.
    let counted = Arc::new(MessagesOut::default());
    let _recorder = metrics::set_default_local_recorder(&*counted);
    let dir = tempfile::tempdir().expect("tempdir");
    let id = WorkerId::parse("w").expect("id");
    let big = 4 * SMALL_FRAME;
    {
        let (sd, _) = StateDir::open(dir.path(), &id).expect("open");
        let state = WorkerMsg::TaskState(TaskState {
            seq: Seq(2),
            task_id: TaskId::parse("t-run").expect("id"),
            attempt: Attempt(1),
            state: serde_json::json!({ "pad": "s".repeat(big) }).into(),
            timestamp: now(),
        });
        sd.write(
            Some(Put::new(Class::Result, Seq(1), &result(1, "t-big", big))),
            &[],
        )
        .expect("write");
        sd.write(Some(Put::new(Class::State, Seq(2), &state)), &[])
            .expect("write");
        sd.write(
            Some(Put::new(Class::Result, Seq(3), &result(3, "t-small", 10))),
            &[],
        )
        .expect("write");
    }
    let (fake, running) = connected_on(dir.path(), Script::SmallFrames).await;
    let outbox = running.handle.outbox.clone();
    assert!(
        held_within(Duration::from_secs(60), || outbox.is_empty()).await,
        "the outbox never drained: {} entries, {} connection attempts",
        outbox.len(),
        fake.attempts().len()
    );
    // A while later, still the first session.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(fake.attempts().len(), 1, "one connection throughout");
    assert_eq!(running.handle.state(), ConnState::Connected);
    let results = fake.results.lock().expect("lock").clone();
    let by_task = |t: &str| {
        results
            .iter()
            .find(|r| r.task_id.as_str() == t)
            .unwrap_or_else(|| panic!("no result of {t}: {results:?}"))
    };
    let failed = by_task("t-big");
    assert_eq!((failed.seq, failed.outcome), (Seq(1), Outcome::Failed));
    let message = failed.error.as_ref().map_or("", |e| e.message.as_str());
    assert!(
        message.contains("larger than a message may be"),
        "{message}"
    );
    assert_eq!(by_task("t-small").outcome, Outcome::Completed);
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(!fake.received_on(0).contains(&2), "the state is never sent");
    assert_eq!(outbox.oversize.load(Ordering::Relaxed), 2);
    // The failure of t-big and t-small went out; the oversize result and state did not.
    assert_eq!(counted.of("task_result"), 2);
    assert_eq!(counted.of("task_state"), 0);
    running.stop().await;
    // The outbox holds the state directory (its journal).
    drop(outbox);
    let (_sd, restored) = StateDir::open(dir.path(), &id).expect("reopen");
    assert!(restored.entries.is_empty(), "{:?}", restored.entries);
}

/// A coordinator that asks for a heartbeat every millisecond (or every 0 ms, and a timeout of
/// 0) is followed no faster than the least interval either side may be configured with: no
/// busy loop of heartbeats, and the session lives on.
#[tokio::test(start_paused = true)]
async fn a_heartbeat_interval_asked_absurdly_short_is_followed_at_the_least_one() {
    for (interval_ms, timeout_ms) in [(1, Some(0)), (0, Some(0)), (1, None)] {
        let fake = FakeConnector::new(Script::Retune {
            interval_ms,
            timeout_ms,
            silent: false,
        });
        let running = Running::start(&fake, config());
        running.wait_state(|s| s == ConnState::Connected).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let beats = fake.heartbeats.load(Ordering::Relaxed);
        // 10 s at 10 ms, and the few before the first answer retuned the session.
        assert!(
            beats <= 1_010,
            "{beats} heartbeats in 10 s, asked {interval_ms} ms"
        );
        assert_eq!(fake.attempts().len(), 1, "asked {interval_ms} ms");
        assert!(running.handle.stats().heartbeat_interval_ms >= 10);
        running.stop().await;
    }
}

/// A heartbeat budget's timeout of `u64::MAX` ms (or of 31 years) is capped: the worker does
/// not set its liveness deadline ages away and wait for ever on a coordinator that fell
/// silent; it declares the session dead within five minutes and connects again.
#[tokio::test(start_paused = true)]
async fn an_absurd_heartbeat_timeout_is_capped_and_a_silent_coordinator_still_noticed() {
    for (interval_ms, timeout_ms) in [(u64::MAX, u64::MAX), (60_000, 1_000_000_000_000)] {
        let fake = FakeConnector::new(Script::Retune {
            interval_ms,
            timeout_ms: Some(timeout_ms),
            silent: true,
        });
        let running = Running::start(&fake, config());
        running.wait_state(|s| s == ConnState::Connected).await;
        let t0 = tokio::time::Instant::now();
        let again = held_within(Duration::from_secs(600), || fake.attempts().len() >= 2).await;
        assert!(
            again,
            "asked {timeout_ms} ms: no new connection after {:?}; worker {:?}",
            t0.elapsed(),
            running.handle.state()
        );
        assert!(
            t0.elapsed() <= Duration::from_secs(300 + 10),
            "{:?}",
            t0.elapsed()
        );
        let timeout = running.handle.stats().heartbeat_timeout_ms;
        assert!(timeout <= 300_000, "{timeout} ms");
        running.stop().await;
    }
}

/// A session whose coordinator asked for a long timeout (a heartbeat budget's), then fell
/// silent: the next session starts from the configured timeout, and the statistics say so
/// before any heartbeat of it is answered (they showed the last session's for as long).
#[tokio::test(start_paused = true)]
async fn a_new_session_shows_the_configured_timeout_not_the_last_sessions() {
    let fake = FakeConnector::new(Script::Retune {
        interval_ms: 20_000,
        timeout_ms: Some(60_000),
        silent: true,
    });
    let cfg = config();
    let configured = cfg.heartbeat_timeout.as_millis() as u64;
    let running = Running::start(&fake, cfg);
    running.wait_state(|s| s == ConnState::Connected).await;
    let stats = || running.handle.stats();
    assert!(
        held_within(Duration::from_secs(30), || stats().heartbeat_timeout_ms
            == 60_000)
        .await,
        "retuned: {:?}",
        stats()
    );
    *fake.script.lock().expect("lock") = Script::RegisterThenSilence;
    assert!(
        held_within(Duration::from_secs(120), || running.handle.registrations()
            == 2)
        .await
    );
    assert_eq!(stats().heartbeat_timeout_ms, configured);
    running.stop().await;
}

/// A checkpoint piece journaled under a larger frame limit than the coordinator now takes is
/// dropped, not sent; the coordinator is told the upload is abandoned (`checkpoint_error`
/// naming it), so that it does not keep the unfinished checkpoint waiting for that piece.
#[tokio::test(start_paused = true)]
async fn a_checkpoint_piece_too_large_for_the_coordinator_abandons_its_upload_saying_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = 4 * SMALL_FRAME;
    let task = TaskId::parse("t-run").expect("id");
    let checkpoint = tether_proto::CheckpointId::parse("c-big").expect("id");
    journal_checkpoint(dir.path(), &task, &checkpoint, 1, big);
    let (fake, running) = connected_on(dir.path(), Script::SmallFrames).await;
    let outbox = running.handle.outbox.clone();
    let errors = fake.checkpoint_errors.clone();
    assert!(
        held_within(Duration::from_secs(60), || outbox.is_empty()
            && !errors.lock().expect("lock").is_empty())
        .await,
        "outbox {} entries, {} checkpoint errors",
        outbox.len(),
        errors.lock().expect("lock").len()
    );
    let errors = errors.lock().expect("lock").clone();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].task_id, task);
    assert_eq!(errors[0].checkpoint_id.as_ref(), Some(&checkpoint));
    assert!(!fake.received_on(0).contains(&2), "the piece is never sent");
    assert_eq!(fake.attempts().len(), 1, "one connection throughout");
    running.stop().await;
}

/// A checkpoint announcement answered `rejected`: the coordinator will take none of its pieces,
/// so the worker drops every piece of it still held, sent and waiting for an acknowledgement
/// that will never come, or not sent yet. The outbox empties though no piece is ever
/// acknowledged (kept, they would wait for acknowledgements for ever and be sent again at
/// every reconnect).
#[tokio::test]
async fn a_checkpoint_answered_rejected_has_its_pieces_dropped_sent_or_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let task = TaskId::parse("t-run").expect("id");
    let checkpoint = tether_proto::CheckpointId::parse("c-refused").expect("id");
    journal_checkpoint(dir.path(), &task, &checkpoint, 32, 16);
    let (fake, running) = connected_on(dir.path(), Script::RejectCheckpoint).await;
    let outbox = running.handle.outbox.clone();
    assert!(
        held_within(Duration::from_secs(30), || outbox.is_empty()).await,
        "outbox still holds {} entries",
        outbox.len()
    );
    assert!(
        !fake.pieces.lock().expect("lock").is_empty(),
        "pieces were sent, unacknowledged: dropped from the outbox by the rejection alone"
    );
    assert_eq!(fake.attempts().len(), 1, "one connection throughout");
    running.stop().await;
}
