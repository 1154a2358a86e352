use std::sync::atomic::Ordering;
use std::time::Duration;

use tether_worker::{AgentError, ConnState, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::fake::{FakeConnector, Running, Script, agent};

fn config() -> WorkerConfig {
    crate::fake::steady_config()
}

fn gaps(attempts: &[tokio::time::Instant]) -> Vec<u64> {
    attempts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect()
}

/// Polls `cond` every `step` until it holds or `limit` passes (virtual time in paused tests);
/// whether it held.
async fn held_within(limit: Duration, step: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let polled = async {
        while !cond() {
            tokio::time::sleep(step).await;
        }
    };
    tokio::time::timeout(limit, polled).await.is_ok()
}

#[tokio::test(start_paused = true)]
async fn reconnect_delays_double_to_the_cap_and_max_attempts_leads_to_failed() {
    let fake = FakeConnector::new(Script::Refuse);
    let mut cfg = config();
    cfg.backoff.max_attempts = Some(9);
    let agent = agent(&fake, cfg);
    let handle = agent.handle();
    let r = agent.run(CancellationToken::new()).await;
    assert!(
        matches!(r, Err(AgentError::GaveUp { attempts: 9 })),
        "{r:?}"
    );
    assert_eq!(handle.state(), ConnState::Failed);
    assert_eq!(
        gaps(&fake.attempts()),
        [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000]
    );
    let s = handle.stats();
    assert_eq!(s.connection_attempts, 9);
    assert_eq!(s.failed_connections, 9);
    assert_eq!(s.successful_connections, 0);
}

/// Attempts that get no answer at all (a blackhole): the first is waited for until its connect
/// timeout (nothing yet says the path is silent rather than the coordinator busy); after that,
/// each is paced like an attempt that fails at once: the next starts beside the unanswered one
/// after the backoff delay, at most two are under way, and every one counts towards
/// `max_attempts`.
#[tokio::test(start_paused = true)]
async fn unanswered_attempts_are_paced_by_the_backoff_and_count_towards_max_attempts() {
    let fake = FakeConnector::new(Script::Unanswered);
    let mut cfg = config();
    cfg.connect_timeout = Duration::from_secs(10);
    cfg.backoff.max_attempts = Some(4);
    let agent = agent(&fake, cfg);
    let handle = agent.handle();
    let start = tokio::time::Instant::now();
    let r = agent.run(CancellationToken::new()).await;
    assert!(
        matches!(r, Err(AgentError::GaveUp { attempts: 4 })),
        "{r:?}"
    );
    // The first times out at 10 s and the next waits 1 s; then 2 and 4 s beside each other.
    assert_eq!(gaps(&fake.attempts()), [11_000, 2_000, 4_000]);
    // The fourth's delay (8 s) counts its failure; no fifth starts; the worker gives up once
    // the last two under way (started at 13 and 17 s) have timed out.
    assert_eq!(start.elapsed(), Duration::from_secs(27));
    let s = handle.stats();
    assert_eq!(s.connection_attempts, 4);
    assert_eq!(s.failed_connections, 4);
}

/// An attempt refused at once while an older one is still unanswered counts once: the delays
/// go on doubling from where they were, not twice as fast.
#[tokio::test(start_paused = true)]
async fn a_refusal_beside_an_unanswered_attempt_counts_one_failure() {
    let fake = FakeConnector::new(Script::Unanswered);
    let mut cfg = config();
    cfg.connect_timeout = Duration::from_secs(10);
    let running = Running::start(&fake, cfg);
    tokio::time::sleep(Duration::from_millis(12_500)).await;
    fake.set(Script::Refuse);
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while fake.attempts().len() < 5 && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Unanswered at 0 (timed out at 10 s) and 11 s; refused at 13 s (the one of 11 s still
    // under way until 21 s), then at 17 and 25 s.
    assert_eq!(gaps(&fake.attempts())[..4], [11_000, 2_000, 4_000, 8_000]);
    running.stop().await;
}

/// When the path clears, the attempt made after it opens the session while an older one made
/// into the silence is still under way; the older is dropped unused.
#[tokio::test(start_paused = true)]
async fn a_path_that_clears_is_used_by_the_next_attempt_without_waiting_out_the_older() {
    let fake = FakeConnector::new(Script::Unanswered);
    let mut cfg = config();
    cfg.connect_timeout = Duration::from_secs(10);
    let running = Running::start(&fake, cfg);
    tokio::time::sleep(Duration::from_millis(12_000)).await;
    assert_eq!(fake.attempts().len(), 2, "attempts at 0 and 11 s");
    fake.set(Script::Healthy);
    let cleared = tokio::time::Instant::now();
    running.wait_state(|s| s == ConnState::Connected).await;
    assert_eq!(
        cleared.elapsed(),
        Duration::from_secs(1),
        "the attempt due at 13 s opened the session"
    );
    assert_eq!(fake.attempts().len(), 3);
    let s = running.handle.stats();
    assert_eq!(s.successful_connections, 1);
    assert_eq!(
        s.failed_connections, 2,
        "the one timed out, and the one left when its twin opened first"
    );
    assert_eq!(running.handle.registrations(), 1);
    running.stop().await;
}

/// A session that ended by a close, not by silence, says nothing of the path: an attempt after
/// it that is slow to be answered (a coordinator busy with a herd of handshakes) gets no twin.
#[tokio::test(start_paused = true)]
async fn after_a_closed_session_a_slow_attempt_is_waited_for_alone() {
    let fake = FakeConnector::new(Script::RegisterThenClose);
    let mut cfg = config();
    cfg.connect_timeout = Duration::from_secs(10);
    let running = Running::start(&fake, cfg);
    while fake.attempts().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fake.set(Script::Unanswered);
    tokio::time::sleep(Duration::from_secs(9)).await;
    // The session's close, the backoff's 1 s, then one attempt under way for the rest.
    assert_eq!(fake.attempts().len(), 2, "no twin beside the slow attempt");
    running.stop().await;
}

/// A refusal at the upgrade (HTTP 401) counts towards `refusals_before_stop` like a refusal in
/// the session: the worker backs off and tries again, and stops, with the reason, only once
/// refused on that many connections in a row. One refusal (a proxy's hiccup, a forged answer)
/// does not stop it for good.
#[tokio::test(start_paused = true)]
async fn refusals_at_the_upgrade_stop_the_worker_only_after_refusals_before_stop_in_a_row() {
    let fake = FakeConnector::new(Script::Unauthorized);
    let cfg = config();
    assert_eq!(cfg.refusals_before_stop, 3);
    let agent = agent(&fake, cfg);
    let handle = agent.handle();
    let r = agent.run(CancellationToken::new()).await;
    match r {
        Err(AgentError::Refused(reason)) => assert!(reason.contains("401"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        gaps(&fake.attempts()),
        [1_000, 2_000],
        "backed off between them"
    );
    assert_eq!(handle.state(), ConnState::Failed);
    assert_eq!(handle.stats().failed_connections, 3);

    // Refused once, then let in: it registers and keeps working.
    let fake = FakeConnector::new(Script::Unauthorized);
    let running = Running::start(&fake, config());
    while fake.attempts().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fake.set(Script::Healthy);
    running.wait_state(|s| s == ConnState::Connected).await;
    assert_eq!(gaps(&fake.attempts()), [1_000]);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_coordinator_that_accepts_then_closes_does_not_cause_a_tight_loop() {
    let fake = FakeConnector::new(Script::RegisterThenClose);
    let running = Running::start(&fake, config());
    let handle = running.handle.clone();
    let end = tokio::time::Instant::now() + Duration::from_secs(200);
    while fake.attempts().len() < 7 && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
    let g = gaps(&fake.attempts());
    // Registered sessions that do not stay healthy never reset the backoff, and once the link
    // is seen flapping the delays grow faster than the plain doubling.
    assert_eq!(&g[..2], [1_000, 2_000], "{g:?}");
    for (i, gap) in g.iter().enumerate().take(6) {
        assert!(*gap >= 1_000 << i, "gap {i} is {gap} ms: {g:?}");
    }
    assert!(g[2] > 4_000, "adaptive boost on a flapping link: {g:?}");
    assert!(handle.stats().backoff_factor > 2.0);
    assert!(handle.registrations() >= 6);
    assert_eq!(handle.shared.max_live_connections.load(Ordering::SeqCst), 1);
    assert_eq!(handle.shared.live_connections.load(Ordering::SeqCst), 0);
    assert_eq!(handle.state(), ConnState::Shutdown);
    assert_eq!(handle.runner.live_tasks(), 0, "no task outlives the agent");
}

#[tokio::test(start_paused = true)]
async fn a_silent_link_is_declared_dead_after_the_heartbeat_timeout_and_timers_restart() {
    let fake = FakeConnector::new(Script::RegisterThenSilence);
    let running = Running::start(&fake, config());
    let handle = running.handle.clone();
    running.wait_state(|s| s == ConnState::Connected).await;
    let connected = tokio::time::Instant::now();
    // After the first dead session, let the next one be healthy.
    running.wait_state(|s| s != ConnState::Connected).await;
    let dead_after = connected.elapsed();
    fake.set(Script::Healthy);
    assert!(
        dead_after >= Duration::from_secs(15) && dead_after < Duration::from_secs(16),
        "declared dead after {dead_after:?}"
    );
    running.wait_state(|s| s == ConnState::Connected).await;
    // A healthy session is not declared dead: its timers started with it.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(handle.state(), ConnState::Connected);
    let s = handle.stats();
    assert!(s.rtt_samples >= 20, "{s:?}");
    assert_eq!(s.reconnects, 1);
    assert_eq!(fake.attempts().len(), 2);
    running.stop().await;
}

/// A worker stopped while connected stops counting time connected: its figures, read after
/// the stop, do not grow.
#[tokio::test(start_paused = true)]
async fn a_stopped_worker_stops_counting_time_connected() {
    let fake = FakeConnector::new(Script::Healthy);
    let running = Running::start(&fake, config());
    let handle = running.handle.clone();
    running.wait_state(|s| s == ConnState::Connected).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    running.stop().await;
    let at_stop = handle.stats().connected_secs;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(handle.stats().connected_secs, at_stop);
    assert!(at_stop >= 10.0, "{at_stop}");
}

/// A coordinator that registers the worker and then falls silent, again and again: each
/// session is dead from its start, so the delays before the next attempt grow as after any
/// failure. The session used to count as healthy for the liveness timeout it took to find it
/// dead (15 s, past the 10 s that make one healthy) and reset the backoff: a reconnect a
/// second after each detection, for ever, across the fleet.
#[tokio::test(start_paused = true)]
async fn sessions_that_fall_silent_at_once_let_the_backoff_grow() {
    // Each gap: the 15 s to find the session dead, then the backoff delay.
    assert_delays_grow(Script::RegisterThenSilence, config()).await;
}

/// Runs a worker against `script` until it made five attempts, and asserts each gap between
/// them is longer than the one before: the backoff grew after each session.
async fn assert_delays_grow(script: Script, cfg: tether_worker::WorkerConfig) {
    let fake = FakeConnector::new(script);
    let running = Running::start(&fake, cfg);
    assert!(
        held_within(Duration::from_secs(900), Duration::from_secs(1), || {
            fake.attempts().len() >= 5
        })
        .await,
        "five attempts"
    );
    let gaps = gaps(&fake.attempts());
    assert!(
        gaps.windows(2).all(|w| w[1] > w[0]),
        "the delays grow: {gaps:?}"
    );
    running.stop().await;
}

/// A coordinator whose heartbeats come back but which never acknowledges anything, again and
/// again: each session's link was not whole from its first message on, so the delays grow as
/// after any failure (the session counted as healthy for the heartbeats that kept coming, and
/// the backoff was reset at each).
#[tokio::test(start_paused = true)]
async fn sessions_whose_messages_go_unacknowledged_let_the_backoff_grow() {
    let mut cfg = config();
    cfg.telemetry_interval = Duration::from_secs(3);
    assert_delays_grow(Script::Unacknowledging, cfg).await;
}

/// A coordinator whose heartbeats come back but which never acknowledges what the worker sent
/// (a middlebox swallowed it): the session ends once a message has waited the liveness timeout
/// for its acknowledgement, and the next session sends it again. Without this the message
/// would wait in the outbox for as long as the heartbeats kept the session up.
#[tokio::test(start_paused = true)]
async fn a_message_never_acknowledged_ends_the_session_and_goes_again_in_the_next() {
    let fake = FakeConnector::new(Script::Unacknowledging);
    let mut cfg = config();
    cfg.telemetry_interval = Duration::from_secs(3);
    let running = Running::start(&fake, cfg);
    let handle = running.handle.clone();
    running.wait_state(|s| s == ConnState::Connected).await;
    let connected = tokio::time::Instant::now();
    running.wait_state(|s| s != ConnState::Connected).await;
    let ended_after = connected.elapsed();
    fake.set(Script::Healthy);
    // The first telemetry leaves within its period, then waits the 15 s timeout; the check
    // runs with the session's duties (a heartbeat every 5 s).
    assert!(
        ended_after >= Duration::from_secs(15) && ended_after < Duration::from_secs(26),
        "ended after {ended_after:?}"
    );
    let first = fake.received_on(0);
    assert!(!first.is_empty(), "nothing was sent in the first session");
    running.wait_state(|s| s == ConnState::Connected).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    // What the first session left unacknowledged went again first in the second (telemetry
    // is latest-wins: each report replaced the one before it in the outbox, so the last is
    // what was left), and was acknowledged there: that session lasts.
    let second = fake.received_on(1);
    let last = first.last().expect("one");
    assert!(
        second.first() == Some(last),
        "{last} not sent again first: {first:?} / {second:?}"
    );
    assert_eq!(handle.state(), ConnState::Connected);
    assert_eq!(handle.stats().reconnects, 1);
    assert_eq!(fake.attempts().len(), 2);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_liveness_timeout_that_shrinks_as_the_link_recovers_applies_at_once() {
    // Heartbeats answered 4 s late raise the adaptive timeout to 5 + 4 x 4 = 21 s. Once the
    // slow samples have aged out of the RTT window (its last 5 minutes: at a heartbeat every
    // 5 s, the p95 by nearest rank of its 61 samples is prompt once 3 slow ones are left, at the
    // 58th prompt answer) it is 15 s again; the coordinator falls silent right after that
    // answer, and the session must be declared dead 15 s after it, not at the later deadline
    // its liveness timer was last set for. Where that timer stands depends on the phase of the
    // heartbeats against it, so four runs take each phase (the timer is set again every 20 s, a
    // heartbeat comes every 5).
    for slow in 9..13 {
        shrinks_after(slow).await;
    }
}

async fn shrinks_after(slow: u32) {
    const PROMPT: u32 = 58;
    let fake = FakeConnector::new(Script::Recovering {
        slow,
        prompt: PROMPT,
    });
    let running = Running::start(&fake, config());
    let handle = running.handle.clone();
    running.wait_state(|s| s == ConnState::Connected).await;
    let step = Duration::from_millis(10);
    // Bounded (in virtual time): the slow answers take under a minute, the prompt ones ten.
    let raised = held_within(Duration::from_secs(120), step, || {
        handle.stats().heartbeat_timeout_ms == 21_000
    });
    assert!(raised.await, "slow answers raise the timeout to 21 s");
    let answered = held_within(Duration::from_secs(1_200), step, || {
        handle.shared.heartbeats_answered.load(Ordering::Relaxed) >= u64::from(slow + PROMPT)
    });
    assert!(answered.await, "every heartbeat answered");
    let last = tokio::time::Instant::now();
    assert_eq!(handle.stats().heartbeat_timeout_ms, 15_000, "shrunk");
    running.wait_state(|s| s != ConnState::Connected).await;
    let dead_after = last.elapsed();
    assert!(
        dead_after >= Duration::from_secs(15) - step && dead_after < Duration::from_millis(15_500),
        "{slow} slow answers: declared dead {dead_after:?} after the last frame"
    );
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_answer_to_an_older_heartbeat_is_timed_from_that_heartbeat() {
    // Heartbeats every 5 s, each answered 7.3 s after it came: every answer arrives after the
    // next heartbeat went out. Timed against the latest heartbeat (the original's defect) the
    // round trip would read 2.3 s; it is 7.3 s.
    let fake = FakeConnector::new(Script::LateReplies);
    let mut cfg = config();
    cfg.heartbeat_timeout = Duration::from_secs(30);
    let running = Running::start(&fake, cfg);
    let handle = running.handle.clone();
    running.wait_state(|s| s == ConnState::Connected).await;
    let answered = held_within(Duration::from_secs(120), Duration::from_millis(10), || {
        handle.stats().rtt_samples >= 8
    });
    assert!(answered.await, "eight heartbeats answered");
    let s = handle.stats();
    let late = crate::fake::LATE_REPLY.as_secs_f64() * 1e3;
    for rtt in [s.rtt_p50_ms, s.rtt_p99_ms, s.rtt_avg_ms] {
        assert!((rtt - late).abs() < 50.0, "{s:?}");
    }
    assert_eq!(handle.state(), ConnState::Connected);
    assert_eq!(fake.attempts().len(), 1);
    running.stop().await;
}

/// A coordinator whose session stops reading for a while (its core held up) pings the worker
/// meanwhile, then answers every heartbeat held in a burst: those round trips measured its
/// queue, not the path, and are left out. Counted, they put seconds in the p95 and the
/// timeout at its cap for as long as they stayed in the window, and a dead link would then
/// be noticed after a minute instead of the configured timeout.
#[tokio::test(start_paused = true)]
async fn heartbeats_answered_in_a_burst_after_a_coordinator_stall_leave_the_timeout_alone() {
    const PROMPT: u32 = 4;
    let fake = FakeConnector::new(Script::Stall {
        prompt: PROMPT,
        stall_ms: 6_000,
    });
    let mut cfg = config();
    cfg.heartbeat_interval = Duration::from_millis(500);
    cfg.heartbeat_timeout = Duration::from_secs(3);
    let running = Running::start(&fake, cfg);
    let handle = running.handle.clone();
    running.wait_state(|s| s == ConnState::Connected).await;
    let step = Duration::from_millis(10);
    assert_eq!(handle.stats().heartbeat_timeout_ms, 3_000);
    // The stall, then the burst of its answers, then prompt answers again.
    let answered = handle.shared.heartbeats_answered.load(Ordering::Relaxed);
    let after = held_within(Duration::from_secs(60), step, || {
        handle.stats().rtt_samples >= u64::from(PROMPT) + 4
    });
    assert!(after.await, "heartbeats answered at once after the stall");
    let held = fake.heartbeats.load(Ordering::Relaxed);
    assert!(held >= 10, "the stall held {held} heartbeats");
    assert!(
        handle.shared.heartbeats_answered.load(Ordering::Relaxed) >= answered + held,
        "the heartbeats held were answered"
    );
    let s = handle.stats();
    assert_eq!(s.heartbeat_timeout_ms, 3_000, "{s:?}");
    assert!(s.rtt_p99_ms < 100.0, "{s:?}");
    assert_eq!(
        handle.state(),
        ConnState::Connected,
        "the pings kept the session"
    );
    assert_eq!(fake.attempts().len(), 1);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_beats_at_the_coordinator_s_interval_when_it_is_shorter_than_its_own() {
    // The fake coordinator's welcome asks for a heartbeat every 5 s.
    let fake = FakeConnector::new(Script::Healthy);
    let mut cfg = config();
    cfg.heartbeat_interval = Duration::from_secs(20);
    cfg.heartbeat_timeout = Duration::from_secs(60);
    let running = Running::start(&fake, cfg);
    let handle = running.handle.clone();
    running.wait_state(|s| s == ConnState::Connected).await;
    tokio::time::sleep(Duration::from_secs(31)).await;
    let s = handle.stats();
    // The first beat comes at a random point of the first period's second half, then one
    // every period: six in 31 s at 5 s, where 20 s would make one or two.
    assert_eq!(
        s.rtt_samples, 6,
        "heartbeats every 5 s, not every 20 s: {s:?}"
    );
    assert_eq!(fake.attempts().len(), 1);
    running.stop().await;
}

/// A worker without a secret needs nothing of the welcome for its registration, so it sends it
/// at once (a round trip sooner when a whole fleet reconnects): it registers even with a
/// coordinator that answers only once the registration is in, and its endpoint URL says so.
#[tokio::test(start_paused = true)]
async fn a_worker_without_a_secret_registers_before_the_welcome_arrives() {
    let fake = FakeConnector::new(Script::WelcomeAfterRegistration);
    let running = Running::start(&fake, config());
    let handle = running.handle.clone();
    tokio::time::timeout(
        Duration::from_secs(5),
        running.wait_state(|s| s == ConnState::Connected),
    )
    .await
    .expect("registered without waiting for the welcome");
    assert_eq!(handle.registrations(), 1);
    assert_eq!(fake.attempts().len(), 1);
    running.stop().await;
    // Its endpoint URL says so (the coordinator may then send the welcome with the ack); a
    // worker with a secret waits for the welcome's nonce and says nothing.
    let urls = fake.urls.lock().expect("lock").clone();
    assert_eq!(
        urls,
        ["ws://coordinator.invalid:1/api/v1/worker/w/ws?pipelined=1"]
    );
    let fake = FakeConnector::new(Script::Healthy);
    let mut cfg = config();
    cfg.secret = Some(
        tether_proto::auth::Secret::new(b"a secret of the state machine test").expect("secret"),
    );
    let running = Running::start(&fake, cfg);
    running.wait_state(|s| s == ConnState::Connected).await;
    let urls = fake.urls.lock().expect("lock").clone();
    assert_eq!(urls, ["ws://coordinator.invalid:1/api/v1/worker/w/ws"]);
    running.stop().await;
}

/// An operator's `checkpoint_request` while the outbox is past its bound (a checkpoint larger
/// than the bound on its own, or a backlog after an outage): the re-upload waits for room that
/// only acknowledgements make, and the session, which reads them, must not wait with it. It
/// goes on reading, acknowledging and heartbeating, and the re-upload completes.
#[tokio::test(start_paused = true)]
async fn a_checkpoint_request_while_the_outbox_is_full_keeps_the_session_and_the_upload_completes()
{
    use crate::fake::BIG_CHECKPOINT;
    let fake = FakeConnector::new(Script::RequestCheckpoint);
    let mut cfg = config();
    // 1 KiB pieces: the checkpoint is 17 entries, the outbox holds 4.
    cfg.checkpoint_chunk_size = 1024;
    cfg.outbox.max_entries = 4;
    let chunks = BIG_CHECKPOINT / 1024;
    let running = Running::start_with_big(&fake, cfg);
    let handle = running.handle.clone();
    running.wait_state(|s| s == ConnState::Connected).await;
    let pieces = || fake.pieces.lock().expect("lock").clone();
    let both = held_within(Duration::from_secs(60), Duration::from_millis(100), || {
        pieces().len() >= 2 * chunks
    });
    assert!(
        both.await,
        "the re-upload did not complete: {} of {} pieces, {} heartbeats answered",
        pieces().len(),
        2 * chunks,
        handle.stats().rtt_samples
    );
    // The same checkpoint twice, each piece in order.
    let got = pieces();
    let id = &got[0].0;
    assert!(got.iter().all(|(c, _)| c == id), "{got:?}");
    let order: Vec<u32> = got.iter().map(|(_, chunk)| *chunk).collect();
    let once: Vec<u32> = (0..chunks as u32).collect();
    assert_eq!(order, [once.clone(), once].concat());
    // The session lived on: heartbeats still go out and come back on the one connection.
    let beats = handle.stats().rtt_samples;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        handle.stats().rtt_samples >= beats + 5,
        "{:?}",
        handle.stats()
    );
    assert_eq!(handle.state(), ConnState::Connected);
    assert_eq!(fake.attempts().len(), 1);
    assert!(handle.outbox.is_empty(), "{:?}", handle.outbox.snapshot());
    running.stop().await;
}

/// The coordinator stops reading for longer than the liveness timeout while its frames still
/// come: the worker's writes wait until the deadline, and the frames read after it keep the
/// session. What the session took from the outbox and could not write goes out in it once
/// the link reads again: every piece arrives, and nothing waits in the outbox for a session
/// that never comes.
#[tokio::test(start_paused = true)]
async fn entries_a_stalled_write_did_not_take_are_sent_when_the_link_reads_again() {
    use crate::fake::{STALL, STALLED_CHECKPOINT};
    let fake = FakeConnector::new(Script::StallReads);
    let cfg = config();
    let chunks = STALLED_CHECKPOINT.div_ceil(cfg.checkpoint_chunk_size);
    let timeout = cfg.heartbeat_timeout;
    assert!(
        STALL > timeout,
        "the writes wait past the liveness deadline"
    );
    let running = Running::start_with_big(&fake, cfg);
    let handle = running.handle.clone();
    running.wait_state(|s| s == ConnState::Connected).await;
    let started = tokio::time::Instant::now();
    let delivered = || {
        let mut got: Vec<u32> = fake
            .pieces
            .lock()
            .expect("lock")
            .iter()
            .map(|p| p.1)
            .collect();
        got.sort_unstable();
        got.dedup();
        got.len()
    };
    let all = held_within(Duration::from_secs(120), Duration::from_millis(100), || {
        delivered() >= chunks && handle.outbox.is_empty()
    });
    assert!(
        all.await,
        "{} of {chunks} pieces delivered; the outbox holds {:?}",
        delivered(),
        handle
            .outbox
            .snapshot()
            .iter()
            .map(|(_, s, m)| (s.0, m.type_name()))
            .collect::<Vec<_>>()
    );
    assert!(
        started.elapsed() >= STALL,
        "delivered only after the stall: {:?}",
        started.elapsed()
    );
    // The frames that kept coming kept the session: the entries went in it.
    assert_eq!(fake.attempts().len(), 1);
    running.stop().await;
}

/// Told to stop during a long outage while it holds something to hand back, the worker tries
/// at once (it has `stop_reconnect` to reach the coordinator), not after the backoff delay it
/// was waiting out (16 s here, past the 10 s it has): a coordinator back in the meantime is
/// reached, and the worker stops after handing back what it holds.
#[tokio::test(start_paused = true)]
async fn a_stop_during_an_outage_cuts_the_delay_under_way_short() {
    let fake = FakeConnector::new(Script::Refuse);
    let cfg = config();
    let window = cfg.stop_reconnect;
    let running = Running::start(&fake, cfg);
    // Something to hand back: a notice not acknowledged.
    running
        .handle
        .outbox
        .push(tether_worker::outbox::Class::Notice, None, |seq| {
            tether_proto::msg::WorkerMsg::TaskPaused(tether_proto::msg::TaskNotice {
                seq,
                task_id: tether_proto::TaskId::parse("t").expect("id"),
                attempt: tether_proto::Attempt(1),
                timestamp: tether_proto::msg::now(),
            })
        });
    // Five attempts: 1 + 2 + 4 + 8 s of delays; the next is 16 s away.
    assert!(
        held_within(Duration::from_secs(60), Duration::from_millis(100), || {
            fake.attempts().len() >= 5
        })
        .await
    );
    fake.set(Script::Healthy);
    running.begin_stop();
    let tried = held_within(window, Duration::from_millis(100), || {
        fake.attempts().len() > 5
    })
    .await;
    assert!(
        tried,
        "no attempt within the {window:?} a stopping worker has"
    );
    running.stop().await;
}

/// A stop while a write waits on a link that reads nothing (it waits until the liveness
/// deadline, 15 s): the tasks are told to stop at once, not once the write gave up, and the
/// running task has ended within a second.
#[tokio::test(start_paused = true)]
async fn a_stop_while_a_write_waits_on_the_link_stops_the_tasks_at_once() {
    let fake = FakeConnector::new(Script::StallReads);
    let cfg = config();
    let timeout = cfg.heartbeat_timeout;
    let running = Running::start_with_big(&fake, cfg);
    let handle = running.handle.clone();
    running.wait_state(|s| s == ConnState::Connected).await;
    // The checkpoint's pieces fill the pipe the coordinator does not read: a write waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(handle.active_tasks().len(), 1, "the task runs");
    let stopped = tokio::time::Instant::now();
    running.begin_stop();
    let ended = || handle.active_tasks().is_empty();
    let told = held_within(Duration::from_secs(1), Duration::from_millis(20), ended).await;
    assert!(
        told,
        "the task still runs {:?} after the stop (the write waits up to {timeout:?})",
        stopped.elapsed()
    );
    running.stop().await;
}
