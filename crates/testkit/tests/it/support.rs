//! Setup and teardown shared by the tests of several modules.

use tether_proto::{TaskId, TaskSpec};
use tether_testkit::*;
use tether_worker::{ConnState, Executor, Executors};

/// A worker `w1` of `c`, with the built-in executors and `run` as `kind`, connected, and one
/// task of that kind submitted to `c`: the worker, a client of `c`, and the task's id.
pub async fn one_task_on_a_worker(
    c: &TestCoordinator,
    kind: &str,
    run: impl Executor,
) -> (TestWorker, Client, TaskId) {
    let mut executors = Executors::builtin();
    executors.register(kind, run);
    let w = spawn_worker(fast_worker_config(&c.ws_url(), "w1"), executors);
    w.wait_state(|s| s == ConnState::Connected).await;
    let client = c.client();
    let id = client
        .submit(&[TaskSpec::new(kind, serde_json::json!({}))])
        .await
        .remove(0);
    (w, client, id)
}

/// Cancels the task `id` and waits until it is cancelled, then stops `w` (cleanly) and `c`.
pub async fn cancel_and_stop(client: &Client, id: &TaskId, w: TestWorker, c: TestCoordinator) {
    client.control(id, "cancel").await;
    client.wait_status(id, "cancelled").await;
    w.stop().await.expect("clean stop");
    c.stop().await;
}
