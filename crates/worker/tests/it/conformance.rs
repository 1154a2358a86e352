use std::sync::atomic::Ordering;
use std::time::Duration;

use tether_proto::WorkerId;
use tether_worker::{Agent, ConnState, Executors, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::fake::{FakeConnector, Script};

#[tokio::test(start_paused = true)]
async fn the_worker_decodes_and_handles_every_coordinator_message() {
    let fake = FakeConnector::new(Script::Conformance);
    let cfg = WorkerConfig::new(
        "ws://coordinator.invalid:1",
        WorkerId::parse("w").expect("id"),
    );
    let agent = Agent::new(cfg, Executors::builtin())
        .expect("config")
        .with_connector(fake.clone());
    let handle = agent.handle();
    let stop = CancellationToken::new();
    let run = tokio::spawn(agent.run(stop.clone()));
    handle.wait_state(|s| s == ConnState::Connected).await;
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
    stop.cancel();
    run.await.expect("join").expect("clean stop");
}
