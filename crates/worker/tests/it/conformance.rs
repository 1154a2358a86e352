use std::sync::atomic::Ordering;
use std::time::Duration;

use tether_proto::WorkerId;
use tether_worker::{ConnState, WorkerConfig};

use crate::fake::{FakeConnector, Running, Script, TOGETHER};

#[tokio::test(start_paused = true)]
async fn the_worker_decodes_and_handles_every_coordinator_message() {
    let (fake, running) = started(Script::Conformance);
    let handle = running.handle.clone();
    running.wait_state(|s| s == ConnState::Connected).await;
    // The sample task_assignment (a 10 ms sleep) runs once.
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while handle.executions() < 1 && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(handle.executions(), 1);
    assert_eq!(
        handle.shared.bad_frames.load(Ordering::SeqCst),
        0,
        "every frame decoded"
    );
    assert_eq!(
        handle.shared.errors_received.load(Ordering::SeqCst),
        1,
        "the sample error"
    );
    assert_eq!(
        handle.state(),
        ConnState::Connected,
        "no message ended the session"
    );
    assert_eq!(fake.attempts().len(), 1);
    running.stop().await;
}

/// One batch frame holding every coordinator message and an unknown one: each is handled as
/// if it came alone, the unknown one is refused alone. A worker that did not offer batching
/// refuses the whole frame (and nothing in it runs).
#[tokio::test(start_paused = true)]
async fn the_worker_handles_a_batch_message_by_message() {
    for batching in [true, false] {
        let fake = FakeConnector::new(Script::BatchConformance);
        let mut cfg = WorkerConfig::new(
            "ws://coordinator.invalid:1",
            WorkerId::parse("w").expect("id"),
        );
        cfg.batching = batching;
        let running = Running::start(&fake, cfg);
        let handle = running.handle.clone();
        running.wait_state(|s| s == ConnState::Connected).await;
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        while handle.shared.bad_frames.load(Ordering::SeqCst) < 1
            && tokio::time::Instant::now() < end
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let expect = u64::from(batching);
        assert_eq!(handle.executions(), expect, "batching {batching}");
        assert_eq!(
            handle.shared.bad_frames.load(Ordering::SeqCst),
            1,
            "the unknown message, or the refused batch (batching {batching})"
        );
        assert_eq!(
            handle.shared.errors_received.load(Ordering::SeqCst),
            expect,
            "the sample error (batching {batching})"
        );
        assert_eq!(handle.state(), ConnState::Connected);
        running.stop().await;
    }
}

/// Messages that tasks make in the same scheduler round leave in one frame: the session lets
/// the other woken tasks run before it gathers the outbox. On one runtime thread the task that
/// first wakes the session would otherwise hand it the thread at once (tokio's LIFO slot), and
/// each task's update would go in a frame of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn updates_made_in_the_same_round_share_a_frame() {
    let fake = FakeConnector::new(Script::AssignTogether);
    let mut cfg = WorkerConfig::new(
        "ws://coordinator.invalid:1",
        WorkerId::parse("w").expect("id"),
    );
    cfg.slots = TOGETHER as u32;
    let running = Running::start(&fake, cfg);
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let total = || {
        fake.states_per_frame
            .lock()
            .expect("lock")
            .iter()
            .sum::<usize>()
    };
    while total() < TOGETHER && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let frames = fake.states_per_frame.lock().expect("lock").clone();
    assert_eq!(total(), TOGETHER, "every task's state arrived: {frames:?}");
    assert!(
        frames.len() <= 2,
        "{TOGETHER} states made in one round went in {} frames: {frames:?}",
        frames.len()
    );
    running.stop().await;
}

/// A worker against a fake coordinator playing `script`.
fn started(script: Script) -> (FakeConnector, Running) {
    let fake = FakeConnector::new(script);
    let cfg = WorkerConfig::new(
        "ws://coordinator.invalid:1",
        WorkerId::parse("w").expect("id"),
    );
    let running = Running::start(&fake, cfg);
    (fake, running)
}

/// A worker against a fake coordinator playing `script`, run until the coordinator has a
/// task result (or two minutes of virtual time went by).
async fn until_a_result(script: Script) -> (FakeConnector, Running) {
    let (fake, running) = started(script);
    let end = tokio::time::Instant::now() + Duration::from_secs(120);
    while fake.outcomes.lock().expect("lock").is_empty() && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (fake, running)
}

/// A coordinator that does not know `checkpoint_fetch` (one rolled back while a fetch was
/// under way) answers it with `unknown_type`: the fetch ends, the attempt runs afresh and
/// reports, and the session lives on. Were the refusal only logged, no piece would ever come:
/// the task would never run, and the fetch never acknowledged would end session after session.
#[tokio::test(start_paused = true)]
async fn a_fetch_the_coordinator_cannot_read_ends_and_its_task_runs_afresh() {
    let (fake, running) = until_a_result(Script::UnknownFetch).await;
    let outcomes = fake.outcomes.lock().expect("lock").clone();
    assert_eq!(outcomes, [tether_proto::Outcome::Completed]);
    assert_eq!(fake.attempts().len(), 1, "one session throughout");
    running.stop().await;
}

/// Waits until two more heartbeats were answered. The fake answers what it read at once, so
/// the answers to heartbeats it reads afterwards follow that answer on the socket: two more RTT
/// samples (one answer may have been on its way before) mean the worker has read `what`.
async fn read_past(running: &Running, what: &str) {
    let samples = || running.handle.stats().rtt_samples;
    let before = samples();
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while samples() < before + 2 && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        samples() >= before + 2,
        "no heartbeat answered after the {what}"
    );
}

/// The result a scripted coordinator answered with something other than its ack was sent
/// once, and is still held after the worker read that answer.
async fn result_still_held(script: Script, answer: &str) {
    let (fake, running) = until_a_result(script).await;
    assert_eq!(
        fake.outcomes.lock().expect("lock").len(),
        1,
        "the result was sent"
    );
    read_past(&running, answer).await;
    let held = running.handle.outbox.pending_results();
    assert_eq!(held.len(), 1, "the result is still held: {held:?}");
    running.stop().await;
}

/// A `checkpoint_piece` acknowledges its fetch and nothing else: one whose `ack_seq` names a
/// result (a confused coordinator) leaves the result held, to be sent again.
#[tokio::test(start_paused = true)]
async fn a_piece_naming_a_result_does_not_acknowledge_it() {
    result_still_held(Script::PieceForResult, "piece").await;
}

/// Only a `task_result_ack` acknowledges a result: a `task_state_ack` or an `acks` that names
/// a result's `seq` (a confused coordinator, or a frame forged on a session without tags)
/// leaves the result held, to be sent again, not dropped undelivered.
#[tokio::test(start_paused = true)]
async fn acks_naming_a_result_do_not_acknowledge_it() {
    result_still_held(Script::AcksForResult, "acks").await;
}

/// A fetch is answered by its piece (or an error): an `acks` that covers its `seq` leaves it
/// held, to be sent again, instead of leaving the attempt waiting for ever on a piece that
/// will never come.
#[tokio::test(start_paused = true)]
async fn acks_naming_a_fetch_do_not_end_it() {
    let (_fake, running) = started(Script::AcksForFetch);
    let fetch_held = || {
        running
            .handle
            .outbox
            .snapshot()
            .iter()
            .any(|(_, _, m)| m.type_name() == "checkpoint_fetch")
    };
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while !fetch_held() && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        fetch_held(),
        "the fetch is held (made, and not ended by the acks)"
    );
    read_past(&running, "acks").await;
    assert!(fetch_held(), "the fetch is still held");
    running.stop().await;
}

/// An `error` that names a `checkpoint_fetch` it could not read ends that fetch, and nothing
/// else its `ref_seq` might name: one naming a result's `seq` (a confused coordinator, or an
/// error forged on the wire) leaves the result held, to be sent again.
#[tokio::test(start_paused = true)]
async fn an_error_naming_a_result_as_a_fetch_does_not_discard_it() {
    let (fake, running) = until_a_result(Script::ErrorForResult).await;
    assert_eq!(
        fake.outcomes.lock().expect("lock").len(),
        1,
        "the result was sent"
    );
    // The error came back (a round trip); the result is still held.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        running
            .handle
            .shared
            .errors_received
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let held = running.handle.outbox.pending_results();
    assert_eq!(held.len(), 1, "the result is still held: {held:?}");
    running.stop().await;
}
