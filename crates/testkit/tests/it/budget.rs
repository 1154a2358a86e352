//! The heartbeat budget: a fleet larger than the budget times the interval is told, in
//! heartbeat replies, a longer interval and a longer timeout in proportion; its workers beat
//! at it and stay connected; when the fleet shrinks, the ones left beat faster again.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tether_testkit::*;
use tether_worker::{ConnState, Executors};

use crate::support::coordinator_with;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_fleet_past_the_heartbeat_budget_beats_slower_and_stays_connected() {
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.heartbeat_interval = Duration::from_millis(100);
        cfg.heartbeat_timeout = Duration::from_secs(1);
        // Three workers at 100 ms would be 30 heartbeats a second: told 1.5 s, longer than the
        // configured timeout, so both sides must take the stretched timeout (15 s) too.
        cfg.heartbeat_budget = 2;
    })
    .await;
    let workers: Vec<TestWorker> = (0..3)
        .map(|i| {
            let mut w = fast_worker_config(&c.ws_url(), &format!("budget-{i}"));
            w.heartbeat_interval = Duration::from_millis(100);
            w.heartbeat_timeout = Duration::from_secs(1);
            // Only heartbeats in the frames counted below, and no WebSocket pings to keep a
            // session alive between them.
            w.telemetry_interval = Duration::from_secs(600);
            w.ws_ping_interval = Duration::from_secs(600);
            spawn_worker(w, Executors::builtin())
        })
        .collect();
    let beats = |w: &TestWorker| {
        let s = w.handle.stats();
        (s.heartbeat_interval_ms, s.heartbeat_timeout_ms)
    };
    wait_for("every worker to be retuned", DEADLINE, || async {
        workers
            .iter()
            .all(|w| {
                let (interval, timeout) = beats(w);
                interval == 1_500 && timeout >= 15_000
            })
            .then_some(())
    })
    .await;
    // Over 3 s the fleet sends about 6 heartbeats (90 at the configured interval), and no
    // session is closed for a silence longer than the configured timeouts.
    let frames = || c.handles.counters.frames_in.load(Ordering::Relaxed);
    let reconnects = || c.handles.counters.reconnections.load(Ordering::Relaxed);
    let (f0, r0) = (frames(), reconnects());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = frames() - f0;
    assert!((3..=20).contains(&sent), "{sent} frames in 3 s");
    assert_eq!(reconnects(), r0, "a session was closed");
    for w in &workers {
        assert_eq!(w.handle.state(), ConnState::Connected);
    }
    // The fleet shrinks to one: it is told 500 ms (and 5 s).
    let mut workers = workers.into_iter();
    let last = workers.next().expect("a worker");
    for w in workers {
        w.stop().await.expect("stop");
    }
    wait_for("the last worker to beat faster again", DEADLINE, || async {
        let (interval, timeout) = beats(&last);
        (interval == 500 && (5_000..15_000).contains(&timeout)).then_some(())
    })
    .await;
    last.stop().await.expect("stop");
    c.stop().await;
}
