//! A checkpoint asked of a running task (`POST /tasks/{id}/checkpoint`, `tether checkpoint`):
//! what the user can read of the worker's answer.

use tether_testkit::*;

use crate::support::{cancel_and_stop, coordinator, one_task_on_a_worker};

/// A worker that cannot provide the checkpoint asked for answers `checkpoint_error`; its
/// reason is kept on the task's attempt, where `tether task` and `tether checkpoint --wait`
/// read it. Before, it reached only the coordinator's log: the user never learnt why no
/// checkpoint came.
#[tokio::test]
async fn a_workers_checkpoint_error_is_shown_on_the_tasks_attempt() {
    let (_dir, c) = coordinator().await;
    // Makes no checkpoint: the worker has none to give.
    let no_checkpoints = executor(|_, ctx| async move {
        ctx.cancelled().await;
        Err(tether_worker::ExecError::Cancelled)
    });
    let (w, client, id) = one_task_on_a_worker(&c, "no-checkpoints", no_checkpoints).await;
    client.wait_status(&id, "running").await;
    let before = client.task(&id).await;
    assert!(
        before["attempts"][0]["checkpoint_error"].is_null(),
        "{before}"
    );
    let (code, body) = client.control(&id, "checkpoint").await;
    assert_eq!(code, 200, "{body}");
    let t = wait_for("the worker's answer on the attempt", DEADLINE, || async {
        let t = client.task(&id).await;
        (!t["attempts"][0]["checkpoint_error"].is_null()).then_some(t)
    })
    .await;
    let error = t["attempts"][0]["checkpoint_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains(&format!("no checkpoint for task {id} yet")),
        "{t}"
    );
    assert!(t["attempts"][0]["checkpoint_error_at"].is_string(), "{t}");
    cancel_and_stop(&client, &id, w, c).await;
}
