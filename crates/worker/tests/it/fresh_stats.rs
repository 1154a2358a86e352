//! What the coordinator holds of a worker's connection statistics after a reconnect: fresh
//! within a round trip of the registration, and the new session's round trips within its first
//! heartbeat, not a telemetry interval (30 s by default) later.

use std::time::Duration;

use tether_proto::task::ConnStats;
use tether_worker::ConnState;
use tokio::time::Instant;

use crate::fake::{FakeConnector, Running, Script, steady_config};

/// Telemetry every hour: the periodic report is due half an hour after a registration at the
/// soonest, so whatever the fake coordinator holds sooner was sent for the registration.
const RARE: Duration = Duration::from_secs(3600);

/// Waits (virtual time) until the fake coordinator received on connection `conn` a report
/// that satisfies `f`, failing the test at `deadline` with what it did receive.
async fn report_on(
    fake: &FakeConnector,
    conn: usize,
    deadline: Instant,
    f: impl Fn(&ConnStats) -> bool,
) -> ConnStats {
    loop {
        let found = fake
            .telemetry
            .lock()
            .expect("lock")
            .iter()
            .find(|(c, s)| *c == conn && f(s))
            .map(|(_, s)| s.clone());
        if let Some(s) = found {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no such report on connection {conn}: {:?}",
            fake.telemetry.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A session closed by the coordinator at once, then a healthy one: the coordinator's copy of
/// the worker's statistics counts the reconnect and says `connected` at the registration (it
/// showed the pre-fault figures for up to a telemetry interval), with no round trip of the
/// old session in its RTT; the first heartbeat answered in the new session is reported at once.
#[tokio::test(start_paused = true)]
async fn a_reconnect_is_reported_at_the_registration_not_a_telemetry_interval_later() {
    let fake = FakeConnector::new(Script::RegisterThenClose);
    let mut cfg = steady_config();
    cfg.telemetry_interval = RARE;
    let heartbeat = cfg.heartbeat_interval;
    let running = Running::start(&fake, cfg);
    let deadline = Instant::now() + Duration::from_secs(60);
    while running.handle.registrations() == 0 || running.handle.state() == ConnState::Connected {
        assert!(Instant::now() < deadline, "the first session never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The next attempt comes after the first delay (1 s): it finds a healthy coordinator.
    fake.set(Script::Healthy);
    running.wait_state(|s| s == ConnState::Connected).await;
    assert_eq!(running.handle.registrations(), 2);
    let registered = Instant::now();
    let fresh = report_on(&fake, 1, registered + Duration::from_secs(1), |_| true).await;
    assert_eq!(fresh.state, "connected");
    assert_eq!((fresh.reconnects, fresh.disconnections), (1, 1));
    assert_eq!(
        (fresh.rtt_samples, fresh.rtt_p50_ms),
        (0, 0.0),
        "no round trip of this session yet"
    );
    // The first heartbeat goes within its first period, and its answer is reported at once.
    let measured = report_on(&fake, 1, registered + heartbeat * 2, |s| s.rtt_samples > 0).await;
    assert_eq!(
        (measured.reconnects, measured.state.as_str()),
        (1, "connected")
    );
    running.stop().await;
}
