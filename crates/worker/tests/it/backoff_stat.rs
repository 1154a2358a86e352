//! The backoff statistic of a connected worker (`next_backoff_ms`) is the delay its next wait
//! would start from, not the one its last outage had grown to.

use std::time::Duration;

use tether_proto::WorkerId;
use tether_worker::backoff::Jitter;
use tether_worker::{ConnState, WorkerConfig};

use crate::fake::{FakeConnector, Running, Script};

/// Four failed attempts (at 0, 1, 3 and 7 s) grow the delay to 16 s; the fifth (at 15 s)
/// registers. Lost at once, the session would be followed by that delay (it is not healthy
/// yet), and the statistic says so; once the coordinator was heard `healthy_after` into it (a
/// heartbeat answered past 5 s: the second, by 10 s), a loss starts the delays over from the
/// first, and the statistic says that (it kept saying 16 s for as long as the session lasted,
/// while the waits after its loss were 1, 2, 4 s).
#[tokio::test(start_paused = true)]
async fn a_healthy_session_reports_the_first_delay_as_the_next() {
    let fake = FakeConnector::new(Script::Refuse);
    let mut cfg = WorkerConfig::new(
        "ws://coordinator.invalid:1",
        WorkerId::parse("w").expect("id"),
    );
    cfg.backoff.jitter = Jitter::None;
    cfg.seed = Some(1);
    cfg.healthy_after = Duration::from_secs(5);
    let initial_ms = cfg.backoff.initial.as_millis() as u64;
    let running = Running::start(&fake, cfg);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(fake.attempts().len(), 4);
    assert_eq!(running.handle.stats().next_backoff_ms, 16_000);
    fake.set(Script::Healthy);
    running.wait_state(|s| s == ConnState::Connected).await;
    assert_eq!(
        running.handle.stats().next_backoff_ms,
        16_000,
        "registered just now: a loss now would wait the grown delay"
    );
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(running.handle.state(), ConnState::Connected);
    assert_eq!(
        running.handle.stats().next_backoff_ms,
        initial_ms,
        "healthy: a loss now starts the delays over"
    );
    running.stop().await;
}

/// The same grown delay, then a coordinator that registers the worker and falls silent (a
/// black hole): the session is not healthy however long its liveness timeout (15 s) takes to
/// find it dead, since its loss counts it alive up to its last frame, the registration's. The
/// statistic says the grown delay throughout, and it is the wait after the loss. (It said the
/// first delay from `healthy_after` on, by the session's age, while the wait was 16 s.)
#[tokio::test(start_paused = true)]
async fn a_session_silent_since_its_registration_reports_the_grown_delay_it_is_followed_by() {
    let fake = FakeConnector::new(Script::Refuse);
    let mut cfg = crate::fake::steady_config();
    cfg.healthy_after = Duration::from_secs(5);
    let running = Running::start(&fake, cfg);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(running.handle.stats().next_backoff_ms, 16_000);
    fake.set(Script::RegisterThenSilence);
    running.wait_state(|s| s == ConnState::Connected).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        running.handle.state(),
        ConnState::Connected,
        "not found dead yet"
    );
    let said = running.handle.stats().next_backoff_ms;
    assert_eq!(said, 16_000, "nothing heard since the registration");
    running.wait_state(|s| s != ConnState::Connected).await;
    let lost = tokio::time::Instant::now();
    let attempts = fake.attempts().len();
    let deadline = lost + Duration::from_secs(60);
    while fake.attempts().len() == attempts {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no attempt after the loss"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waited = fake.attempts()[attempts] - lost;
    assert_eq!(waited.as_millis() as u64, said, "the wait after the loss");
    running.stop().await;
}
