//! The send rate the statistics show (`send_bytes_per_sec`) is measured from the messages the
//! session sent while more waited in the outbox, marked so as they go: a worker's upload over a
//! path of 300 ms sets it, the reports it sends alone afterwards do not (they still size the
//! window and the pieces).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tether_worker::ConnState;
use tokio::time::Instant;

use crate::fake::{FakeConnector, Running, SLOW_ACKS_CHECKPOINT, Script, steady_config};

/// The path's round trip: every message is acknowledged this long after it came.
const PATH: u64 = 300;

/// A checkpoint of 4 MiB over a path of 300 ms with no bandwidth limit, eight windows of
/// 512 KiB: each piece sent while more waited, a window's worth acknowledged within a round
/// trip, so the rate shown is some MB/s. Then a minute idle but for reports every 2 s, each
/// sent with nothing behind it and acknowledged 300 ms later (a few kB/s): the window's
/// rate follows them, the rate shown keeps the upload's. With every send marked backlogged
/// the shown rate fell to the reports' few kB/s; with none, it stayed 0.
#[tokio::test(start_paused = true)]
async fn the_shown_send_rate_is_the_backlogged_uploads_not_the_idle_reports() {
    let fake = FakeConnector::new(Script::SlowAcks { ack_ms: PATH });
    let mut cfg = steady_config();
    cfg.telemetry_interval = Duration::from_secs(2);
    let chunks = SLOW_ACKS_CHECKPOINT.div_ceil(cfg.checkpoint_chunk_size);
    let running = Running::start_with_big(&fake, cfg);
    running.wait_state(|s| s == ConnState::Connected).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while fake.pieces.lock().expect("lock").len() < chunks {
        assert!(Instant::now() < deadline, "the checkpoint never went whole");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its last pieces' acknowledgements.
    tokio::time::sleep(Duration::from_millis(2 * PATH)).await;
    let uploaded = running.handle.stats().send_bytes_per_sec;
    assert!(
        uploaded >= 1_000_000,
        "the upload shows {uploaded} B/s: a window of 512 KiB a round trip of 300 ms"
    );

    tokio::time::sleep(Duration::from_secs(60)).await;
    let sizing = running
        .handle
        .shared
        .link_bytes_per_sec
        .load(Ordering::Relaxed);
    assert!(
        sizing <= 10_000,
        "the window is sized from the reports' samples ({sizing} B/s): the idle minute had them"
    );
    let shown = running.handle.stats().send_bytes_per_sec;
    assert_eq!(
        shown, uploaded,
        "the idle reports are left out of the rate shown"
    );
    running.stop().await;
}
