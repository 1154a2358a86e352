//! What a real coordinator shows of a worker's connection statistics: a worker whose path got
//! slower is shown with the new RTT within its first heartbeats, not a telemetry interval on.

use std::time::Duration;

use tether_faultproxy::{Direction, Fault, FaultKind, Target};
use tether_proto::WorkerId;
use tether_testkit::*;
use tether_worker::{ConnState, Executors};

use crate::faults::proxy_in_front;
use crate::support::{connected, coordinator};

/// The worker's telemetry interval: a session's first periodic report comes at half of it at
/// the soonest, so a figure the coordinator shows sooner after a registration came early.
const TELEMETRY: Duration = Duration::from_secs(16);
/// The latency the fault adds each way, ms.
const LATENCY: u64 = 300;

/// The worker's statistics as the coordinator shows them.
async fn shown(client: &Client) -> serde_json::Value {
    let ws: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
    ws.first().map(|w| w["stats"].clone()).unwrap_or_default()
}

/// Worker `w1` reported its RTT over the loopback (the first periodic report); its link is
/// then reset and the proxy adds 300 ms each way: the new session's p50 (600 ms and more) is
/// shown within 5 s of its registration, where its first periodic report comes 8 s after it
/// at the soonest.
#[tokio::test]
async fn a_worker_on_a_slower_path_is_shown_with_its_new_rtt_within_seconds() {
    let (_dir, c) = coordinator().await;
    let proxy = proxy_in_front(&c, 21).await;
    let mut cfg = fast_worker_config(&format!("ws://{}", proxy.listen_addr()), "w1");
    cfg.telemetry_interval = TELEMETRY;
    cfg.heartbeat_timeout = Duration::from_secs(5);
    let w = connected(cfg, Executors::builtin()).await;
    let client = c.client();
    let before = wait_for("the first report with an RTT", 2 * TELEMETRY, || async {
        let s = shown(&client).await;
        (s["rtt_samples"].as_u64() > Some(0)).then_some(s)
    })
    .await;
    assert!(before["rtt_p50_ms"].as_f64() < Some(100.0), "{before}");
    let target = Target::Workers(vec![WorkerId::parse("w1").expect("id")]);
    let slow = proxy
        .add_fault(
            Fault::new(
                "slow",
                FaultKind::Latency {
                    latency_ms: LATENCY,
                    jitter_ms: 0,
                },
                Direction::Both,
            )
            .with_target(target.clone()),
        )
        .await
        .expect("fault");
    let reset = proxy
        .add_fault(
            Fault::new("reset", FaultKind::Reset { timeout_ms: 0 }, Direction::Both)
                .with_target(target),
        )
        .await
        .expect("fault");
    w.wait_state(|s| s != ConnState::Connected).await;
    let cut = reset.remove();
    assert!(cut.connections_reset > 0, "{cut:?}");
    w.wait_state(|s| s == ConnState::Connected).await;
    let registered = tokio::time::Instant::now();
    let after = wait_for("the new RTT shown", Duration::from_secs(5), || async {
        let s = shown(&client).await;
        (s["rtt_p50_ms"].as_f64() >= Some(2.0 * LATENCY as f64)).then_some(s)
    })
    .await;
    assert!(
        registered.elapsed() < TELEMETRY / 2,
        "shown after {:?}: the periodic report's time",
        registered.elapsed()
    );
    assert_eq!(after["reconnects"], 1, "{after}");
    assert!(slow.remove().bytes_delayed > 0);
    w.stop().await.expect("stop");
    c.stop().await;
}
