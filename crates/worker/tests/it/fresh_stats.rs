//! What the coordinator holds of a worker's RTT: a report goes early, within the heartbeats
//! that measured it, when the RTT moved far from the one last reported, and never for a
//! registration alone.

use std::time::Duration;

use tether_worker::ConnState;
use tokio::time::Instant;

use crate::fake::{FakeConnector, Running, Script, steady_config};

/// The telemetry interval: its first report comes at half of it at the soonest, so whatever
/// the fake coordinator holds sooner after a registration was sent early.
const TELEMETRY: Duration = Duration::from_secs(60);
/// The worker's heartbeat period (the fake's welcome asks for the same).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// The path's latency before the reconnect (ms): more than the 20 ms an early report needs
/// the RTT to move by, so that a rule that took no figure shown for 0 ms would report early.
const FIRST: u64 = 100;
/// The slower path's latency after it (ms).
const SLOWER: u64 = 500;

/// A worker reports its RTT (the first periodic report, at `FIRST` ms), is cut off, and
/// reconnects over a path of `then_ms`: when its first report came after its first attempt,
/// and the reports on the new connection before half a telemetry interval, with when each
/// came after the registration.
async fn reports_after_reconnect(then_ms: u64) -> (Duration, Vec<(Duration, f64, u64)>) {
    let fake = FakeConnector::new(Script::PathChange {
        first_ms: FIRST,
        then_ms,
    });
    let mut cfg = steady_config();
    cfg.telemetry_interval = TELEMETRY;
    cfg.heartbeat_interval = HEARTBEAT;
    let running = Running::start(&fake, cfg);
    let deadline = Instant::now() + 4 * TELEMETRY;
    while running.handle.registrations() < 2 || running.handle.state() != ConnState::Connected {
        assert!(Instant::now() < deadline, "no second session");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let registered = Instant::now();
    tokio::time::sleep(TELEMETRY / 2 - Duration::from_millis(100)).await;
    let got = fake.telemetry.lock().expect("lock").clone();
    running.stop().await;
    let first = got
        .iter()
        .find(|(conn, ..)| *conn == 0)
        .expect("a first report");
    let reports = got
        .iter()
        .filter(|(conn, ..)| *conn == 1)
        .map(|(_, at, s)| (*at - registered, s.rtt_p50_ms, s.rtt_samples))
        .collect();
    (first.1 - fake.attempts()[0], reports)
}

/// Over a path of 500 ms after one of 100, the new session's p50 is shown within its third heartbeat and
/// a heartbeat period's spread, not a telemetry interval (here a minute) later; the first
/// session's first report was the periodic one (no figure shown yet: nothing to correct).
/// Without the early report nothing comes before half the interval.
#[tokio::test(start_paused = true)]
async fn a_slower_path_after_a_reconnect_is_reported_within_its_first_heartbeats() {
    let (first, reports) = reports_after_reconnect(SLOWER).await;
    assert!(
        first >= TELEMETRY / 2,
        "the first report came early: {first:?}"
    );
    let [(after, p50, samples)] = reports[..] else {
        panic!("one early report expected: {reports:?}");
    };
    assert!(p50 >= SLOWER as f64, "{p50} ms shown");
    assert!(samples >= 3, "{samples} samples");
    // The third heartbeat goes within three periods of the registration, its answer 500 ms
    // on; the report within a period of that.
    let bound = 4 * HEARTBEAT + Duration::from_millis(SLOWER);
    assert!(after <= bound, "reported {after:?} after the registration");
}

/// A reconnect over the same path moves nothing: no report before the periodic one (a
/// herd reconnecting to a restarted coordinator sends none). Before, session 56 sent one at
/// every registration and every session's first round trip.
#[tokio::test(start_paused = true)]
async fn a_reconnect_over_the_same_path_sends_no_early_report() {
    let (_, reports) = reports_after_reconnect(FIRST).await;
    assert!(reports.is_empty(), "{reports:?}");
}
