//! Real network faults through the fault proxy; each test asserts that its fault fired, then
//! ground truth.

use std::sync::atomic::Ordering;

use tether_faultproxy::{Direction, Fault, FaultKind, Proxy, ProxyConfig, Target};
use tether_proto::{TaskSpec, WorkerId};
use tether_testkit::*;
use tether_worker::{ConnState, Executors};

/// A coordinator, a fault proxy in front of it, and worker `w1` connected through the proxy.
async fn worker_behind_proxy(dir: &tempfile::TempDir) -> (TestCoordinator, Proxy, TestWorker) {
    let c = spawn_coordinator(dir.path().to_owned()).await;
    let proxy = Proxy::start(ProxyConfig {
        name: "coordinator".into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        upstream: c.addr,
        seed: 11,
    })
    .await
    .expect("proxy");
    let w = spawn_worker(
        fast_worker_config(&format!("ws://{}", proxy.listen_addr()), "w1"),
        Executors::builtin(),
    );
    w.handle.wait_state(|s| s == ConnState::Connected).await;
    (c, proxy, w)
}

#[tokio::test]
async fn a_black_holed_worker_is_detected_by_both_sides_and_its_task_completes_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, proxy, w) = worker_behind_proxy(&dir).await;
    let client = c.client();
    let ids = client.submit(&[sleep_task(2_000, 20, 0)]).await;
    wait_for("the worker to run the task", DEADLINE, || async {
        (!w.handle.active_tasks().is_empty()).then_some(())
    })
    .await;
    let hole = proxy
        .add_fault(
            Fault::new("hole", FaultKind::Blackhole, Direction::Both)
                .with_target(Target::Workers(vec![WorkerId::parse("w1").expect("id")])),
        )
        .await
        .expect("fault");
    // No FIN, no RST: only the heartbeat timeout can notice.
    w.handle.wait_state(|s| s != ConnState::Connected).await;
    wait_for("the coordinator to notice", DEADLINE, || async {
        let ws: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
        (ws[0]["state"] == "disconnected").then_some(())
    })
    .await;
    let stats = hole.remove();
    assert!(
        stats.bytes_dropped > 0,
        "the black hole dropped bytes: {stats:?}"
    );
    w.handle.wait_state(|s| s == ConnState::Connected).await;
    client.wait_status(&ids[0], "completed").await;
    assert_eq!(client.results(&ids[0]).await.len(), 1);
    assert_eq!(w.handle.executions(), 1);
    assert_eq!(
        w.handle.shared.max_live_connections.load(Ordering::SeqCst),
        1
    );
    w.stop().await.expect("stop");
    c.stop().await;
}

#[tokio::test]
async fn cancel_and_pause_reach_a_running_command_through_resets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, proxy, w) = worker_behind_proxy(&dir).await;
    let client = c.client();
    let cmd = |secs: &str| {
        TaskSpec::new(
            "command",
            serde_json::json!({"program": "sleep", "args": [secs]}),
        )
    };
    let ids = client.submit(&[cmd("60"), cmd("60")]).await;
    wait_for("both commands to run", DEADLINE, || async {
        (w.handle.active_tasks().len() == 2).then_some(())
    })
    .await;
    // A reset between the worker and the coordinator first: controls still arrive after it.
    let reset = proxy
        .add_fault(Fault::new(
            "rst",
            FaultKind::Reset { timeout_ms: 0 },
            Direction::Both,
        ))
        .await
        .expect("fault");
    wait_for("the reset to fire", DEADLINE, || async {
        (reset.stats().connections_reset > 0).then_some(())
    })
    .await;
    drop(reset);
    w.handle.wait_state(|s| s == ConnState::Connected).await;
    let (s, _) = client.control(&ids[0], "pause").await;
    assert_eq!(s, 200);
    wait_for("the command to be stopped", DEADLINE, || async {
        w.handle
            .active_tasks()
            .iter()
            .any(|t| t.task_id == ids[0] && t.paused)
            .then_some(())
    })
    .await;
    client.wait_status(&ids[0], "paused").await;
    let (s, _) = client.control(&ids[1], "cancel").await;
    assert_eq!(s, 200);
    wait_for("the cancelled command to be killed", DEADLINE, || async {
        (!w.handle.active_tasks().iter().any(|t| t.task_id == ids[1])).then_some(())
    })
    .await;
    let (s, _) = client.control(&ids[0], "resume").await;
    assert_eq!(s, 200);
    client.wait_status(&ids[0], "running").await;
    let (s, _) = client.control(&ids[0], "cancel").await;
    assert_eq!(s, 200);
    wait_for("the worker to be idle", DEADLINE, || async {
        w.handle.active_tasks().is_empty().then_some(())
    })
    .await;
    for id in &ids {
        assert_eq!(client.status(id).await, "cancelled");
    }
    let handle = w.handle.clone();
    w.stop().await.expect("stop");
    assert_eq!(handle.runner.live_tasks(), 0, "no task outlives the agent");
    c.stop().await;
}
