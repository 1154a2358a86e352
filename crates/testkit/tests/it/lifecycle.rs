use std::sync::atomic::Ordering;

use tether_proto::{TaskId, TaskSpec};
use tether_testkit::*;
use tether_worker::{ConnState, Executors};

use crate::raw::Raw;
use crate::support::{
    builtin_and, cancel_and_stop, checkpointed, connected, connected_worker, coordinator,
    coordinator_and_worker, coordinator_with, one_task_on_a_worker, restarted, submit_one,
};

#[tokio::test]
async fn a_worker_registers_and_runs_a_task_to_one_result() {
    let (_dir, c, w, client) = coordinator_and_worker().await;
    let ids = client.submit(&[sleep_task(100, 4, 0)]).await;
    let t = client.wait_status(&ids[0], "completed").await;
    assert_eq!(t["attempt"], 1);
    assert_eq!(t["attempts"][0]["worker"], "w1");
    let results = client.results(&ids[0]).await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["stale"], false);
    assert_eq!(results[0]["body"]["result"]["steps"], 4);
    assert_eq!(w.handle.executions(), 1);
    wait_for("the outbox to drain", DEADLINE, || async {
        w.handle.outbox.is_empty().then_some(())
    })
    .await;
    w.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn an_executor_that_panics_fails_its_task_with_one_result_and_the_worker_runs_on() {
    let (_dir, c) = coordinator().await;
    // Panics in its task, every time it runs.
    let panics = executor(|_, _| async { panic!("the executor's own bug") });
    let (w, client, id) = one_task_on_a_worker(&c, "panics", panics).await;
    let t = client.wait_status(&id, "failed").await;
    assert_eq!(t["attempt"], 1, "{t}");
    let results = client.results(&id).await;
    assert_eq!(results.len(), 1, "{results:?}");
    let error = results[0]["body"]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("executor panicked: the executor's own bug"),
        "{results:?}"
    );
    // The panic took neither the session nor the runner with it: the next task runs, and the
    // panicked one no longer counts as running.
    let next = client.submit(&[sleep_task(10, 1, 0)]).await;
    client.wait_status(&next[0], "completed").await;
    assert_eq!(w.handle.executions(), 2);
    assert!(
        w.handle.active_tasks().is_empty(),
        "{:?}",
        w.handle.active_tasks()
    );
    w.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn a_result_or_state_too_large_for_a_message_is_not_sent_and_the_session_lives_on() {
    // The coordinator takes frames of 1 MiB, the worker 16 (its default): told the smaller
    // limit in the registration's ack, the worker does not send a 2 MB result as it is, which
    // would end the session at the coordinator's limit, and again at every resend.
    const LIMIT: usize = 1024 * 1024;
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.max_frame = LIMIT;
    })
    .await;
    // Reports a state of `config.state_bytes` and returns a result of `config.result_bytes`;
    // with `config.hold`, runs until cancelled after its state.
    let big = executor(|input, ctx| async move {
        let n = |k: &str| input.config[k].as_u64().unwrap_or(0) as usize;
        ctx.report_state(serde_json::json!({ "pad": "s".repeat(n("state_bytes")) }))
            .await?;
        if input.config["hold"] == true {
            ctx.cancelled().await;
            return Err(tether_worker::ExecError::Cancelled);
        }
        Ok(serde_json::json!({ "pad": "r".repeat(n("result_bytes")) }))
    });
    let w = connected(
        fast_worker_config(&c.ws_url(), "w1"),
        builtin_and("big", big),
    )
    .await;
    let client = c.client();
    let big = |state: usize, result: usize, hold: bool| {
        TaskSpec::new(
            "big",
            serde_json::json!({ "state_bytes": state, "result_bytes": result, "hold": hold }),
        )
    };
    let ids = client
        .submit(&[big(10, 2_000_000, false), big(2_000_000, 10, true)])
        .await;
    // The oversize result: the attempt fails, saying why.
    client.wait_status(&ids[0], "failed").await;
    let results = client.results(&ids[0]).await;
    assert_eq!(results.len(), 1, "{results:?}");
    let error = results[0]["body"]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("larger than a message may be"), "{error}");
    // The oversize state: replaced by a note of its size, recorded while the task runs.
    let path = format!("/api/v1/tasks/{}/state", ids[1]);
    let state = wait_for("the note of the state's size", DEADLINE, || async {
        let (_, v) = client.get(&path).await;
        (!v["state"].is_null()).then_some(v)
    })
    .await;
    assert_eq!(
        state["state"]["state_too_large"]["bytes"], 2_000_010,
        "{state}"
    );
    client.control(&ids[1], "cancel").await;
    client.wait_status(&ids[1], "cancelled").await;
    // One session throughout, and the worker still works.
    let next = client.submit(&[sleep_task(10, 1, 0)]).await;
    client.wait_status(&next[0], "completed").await;
    assert_eq!(w.handle.registrations(), 1);
    w.stop().await.expect("clean stop");
    c.stop().await;
}

/// A result made while the coordinator was away, under its old frame limit, is queued as it
/// is; the coordinator comes back with a smaller `max_frame`. Sent, the result would end every
/// session at the new limit (close 1009) and the worker would never make progress: it fails
/// its attempt instead, saying so, and the session lives on.
#[tokio::test]
async fn a_result_queued_before_the_coordinator_came_back_with_smaller_frames_fails_its_attempt() {
    const SMALLER: usize = 1024 * 1024;
    let (dir, c) = coordinator().await;
    let addr = c.addr;
    let go = tokio_util::sync::CancellationToken::new();
    let big = {
        let go = go.clone();
        executor(move |_, _| {
            let go = go.clone();
            async move {
                go.cancelled().await;
                Ok(serde_json::json!({ "pad": "r".repeat(2 * SMALLER) }))
            }
        })
    };
    let (w, client, id) = one_task_on_a_worker(&c, "big", big).await;
    client.wait_status(&id, "running").await;
    c.stop().await;
    w.wait_state(|s| s != ConnState::Connected).await;
    // Within the old limit (16 MiB): queued as it is.
    go.cancel();
    wait_for("the result to be queued", DEADLINE, || async {
        (w.handle.outbox.pending_results().len() == 1).then_some(())
    })
    .await;
    let mut ccfg = fast_coordinator_config(dir.path().to_owned());
    ccfg.max_frame = SMALLER;
    let c = spawn_coordinator_with(ccfg, Some(addr)).await;
    let client = c.client();
    client.wait_status(&id, "failed").await;
    let results = client.results(&id).await;
    assert_eq!(results.len(), 1, "{results:?}");
    let error = results[0]["body"]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("larger than a message may be"), "{error}");
    // One session with each coordinator, and the worker still works.
    let next = client.submit(&[sleep_task(10, 1, 0)]).await;
    client.wait_status(&next[0], "completed").await;
    assert_eq!(w.handle.registrations(), 2);
    assert_eq!(
        w.handle
            .outbox
            .oversize
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    w.stop().await.expect("clean stop");
    c.stop().await;
}

#[tokio::test]
async fn checkpoint_pieces_fit_in_the_frames_the_coordinator_takes() {
    // A coordinator that takes 256 KiB frames, a worker whose pieces are 256 KiB (342 KiB as
    // base64): told the limit, the worker cuts smaller pieces, and the checkpoint arrives.
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.max_frame = 256 * 1024;
    })
    .await;
    let checkpoints = executor(|_, ctx| async move {
        ctx.checkpoint(vec![7u8; 600_000]).await;
        // Running on, so that the checkpoint is one of a running attempt.
        ctx.cancelled().await;
        Err(tether_worker::ExecError::Cancelled)
    });
    let (w, client, id) = one_task_on_a_worker(&c, "checkpoints", checkpoints).await;
    let t = checkpointed(&client, &id).await;
    assert_eq!(t["latest_checkpoint"]["size"], 600_000, "{t}");
    assert_eq!(w.handle.registrations(), 1);
    cancel_and_stop(&client, &id, w, c).await;
}

/// A checkpoint larger than the coordinator keeps (its `registration_ack` says how large) is
/// announced alone (`executor::tests`: no piece is sent only to see the announcement
/// refused). The coordinator
/// refuses it, counts it and says so on the task's attempt (a resume would start from an
/// earlier checkpoint). The next one, within the limit, is stored.
#[tokio::test]
async fn a_checkpoint_larger_than_the_coordinator_keeps_is_announced_alone_and_refused_visibly() {
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.max_checkpoint_bytes = 100_000;
    })
    .await;
    let checkpoints = executor(|_, ctx| async move {
        ctx.checkpoint(vec![7u8; 300_000]).await;
        ctx.checkpoint(vec![8u8; 50_000]).await;
        ctx.cancelled().await;
        Err(tether_worker::ExecError::Cancelled)
    });
    let (w, client, id) = one_task_on_a_worker(&c, "checkpoints", checkpoints).await;
    let t = checkpointed(&client, &id).await;
    assert_eq!(t["latest_checkpoint"]["size"], 50_000, "{t}");
    let refused = t["attempts"][0]["checkpoint_refused"]
        .as_str()
        .unwrap_or_default();
    assert!(
        refused.contains("300000 bytes exceeds the limit of 100000"),
        "{t}"
    );
    let o = client.overview().await;
    assert_eq!(o["counters"]["checkpoints_too_large"], 1, "{o}");
    cancel_and_stop(&client, &id, w, c).await;
}

#[tokio::test]
async fn two_workers_with_distinct_ids_stay_distinct_and_share_the_work() {
    let (_dir, c) = coordinator().await;
    // One through a bare host:port, one through a full endpoint URL with the placeholder.
    let a = spawn_worker(
        fast_worker_config(&c.addr.to_string(), "worker-a"),
        Executors::builtin(),
    );
    let b = spawn_worker(
        fast_worker_config(
            &format!("{}/api/v1/worker/{{worker_id}}/ws", c.ws_url()),
            "worker-b",
        ),
        Executors::builtin(),
    );
    a.wait_state(|s| s == ConnState::Connected).await;
    b.wait_state(|s| s == ConnState::Connected).await;
    let client = c.client();
    let workers: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
    let ids: Vec<&str> = workers
        .iter()
        .map(|w| w["worker_id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(ids, ["worker-a", "worker-b"]);
    let specs: Vec<TaskSpec> = (0..8).map(|_| sleep_task(200, 2, 0)).collect();
    let ids = client.submit(&specs).await;
    for id in &ids {
        client.wait_status(id, "completed").await;
    }
    assert!(a.handle.executions() > 0 && b.handle.executions() > 0);
    assert_eq!(a.handle.executions() + b.handle.executions(), 8);
    a.stop().await.expect("stop");
    b.stop().await.expect("stop");
    c.stop().await;
}

/// A connection of the same worker (the same process reconnecting) replaces its session
/// cleanly: the old one is closed with 4009, and the late close of each replaced session never
/// unregisters the live one.
#[tokio::test]
async fn a_second_connection_with_the_same_id_replaces_the_first_cleanly() {
    let (_dir, c) = coordinator().await;
    // Two connections of one raw process (one boot id): the second replaces the first.
    let mut first = Raw::connect(&c, "dup").await;
    first.send(&first.registration(None, &[])).await;
    let mut second = Raw::connect(&c, "dup").await;
    second.send(&second.registration(None, &[])).await;
    assert_eq!(first.close_code().await, Some(4009));
    drop(first);
    let client = c.client();
    let o = client.overview().await;
    assert_eq!(o["counters"]["sessions_replaced"], 1, "{o}");
    assert_eq!(o["counters"]["id_conflicts"], 0, "{o}");
    let workers: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0]["state"], "connected", "{workers:?}");
    drop(second);
    c.stop().await;
}

/// Two live processes started with the same worker id (a misconfiguration) used to replace
/// each other's sessions for ever, both running the worker's tasks. The newer one keeps the
/// id; the one it replaced is refused when it comes back and stops, saying why; the task it was
/// running is finished by the newer one and counted once.
#[tokio::test]
async fn a_second_process_with_the_same_id_takes_it_over_and_the_first_stops_saying_why() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    let first = connected_worker(&c.ws_url(), "dup").await;
    let ids = client.submit(&[sleep_task(1_500, 3, 0)]).await;
    wait_for("the task to run on the first", DEADLINE, || async {
        (client.status(&ids[0]).await == "running").then_some(())
    })
    .await;
    let second = connected_worker(&c.ws_url(), "dup").await;
    let workers: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
    let second_boot = workers[0]["boot_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let refused = tokio::time::timeout(2 * DEADLINE, first.join)
        .await
        .expect("the replaced process stops")
        .expect("agent task")
        .expect_err("refused");
    assert!(
        matches!(&refused, tether_worker::AgentError::Refused(r) if r.contains(&second_boot)),
        "{refused}"
    );
    client.wait_status(&ids[0], "completed").await;
    let results = client.results(&ids[0]).await;
    let counted = results.iter().filter(|r| r["stale"] == false);
    assert_eq!(counted.count(), 1, "{results:?}");
    let o = client.overview().await;
    assert_eq!(o["counters"]["sessions_replaced"], 1, "{o}");
    assert!(o["counters"]["id_conflicts"].as_u64() >= Some(1), "{o}");
    // The newer process kept its one session throughout.
    assert_eq!(second.handle.state(), ConnState::Connected);
    assert_eq!(
        second.handle.shared.registrations.load(Ordering::Relaxed),
        1
    );
    let workers: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
    assert_eq!(workers[0]["boot_id"], second_boot.as_str(), "{workers:?}");
    second.stop().await.expect("stop");
    c.stop().await;
}

/// The worker list as `GET /api/v1/workers` gives it: (id, state, boot_id) by id.
async fn worker_list(client: &Client) -> Vec<(String, String, String)> {
    let workers: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
    let mut v: Vec<(String, String, String)> = workers
        .iter()
        .map(|w| {
            let s = |k: &str| w[k].as_str().unwrap_or_default().to_owned();
            (s("worker_id"), s("state"), s("boot_id"))
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_connection_that_never_registers_is_not_listed_or_saved_once_it_ends() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    // A worker that registers, then goes.
    let mut known = Raw::connect(&c, "known").await;
    let reg = known.registration(None, &[]);
    known.send(&reg).await;
    known.next_of("registration_ack").await;
    // Two connections that never register: one closes, one drops its socket (an error).
    let mut closes = Raw::connect(&c, "closes").await;
    let drops = Raw::connect(&c, "drops").await;
    // Open (each has its welcome), they are not workers: the core has not heard of them.
    assert_eq!(
        worker_list(&client).await,
        vec![("known".into(), "connected".into(), "b-raw".into())],
        "while they are open"
    );
    known.ws.close(None).await.expect("close");
    closes.ws.close(None).await.expect("close");
    drop(drops);
    // Every session has ended: the registered worker disconnected.
    let list = wait_for("every session to end", DEADLINE, || async {
        let l = worker_list(&client).await;
        let ended = !l.iter().any(|w| w.1 == "connected");
        ended.then_some(l)
    })
    .await;
    let expected = vec![("known".into(), "disconnected".into(), "b-raw".into())];
    assert_eq!(list, expected, "only the registered worker is listed");
    let o = client.overview().await;
    assert_eq!(o["workers_known"], 1, "{o}");
    assert_eq!(o["workers"]["disconnected"], 1, "{o}");
    let states: Vec<_> = o["workers"].as_object().expect("workers").keys().collect();
    assert_eq!(
        states,
        ["connected", "disconnected", "lost", "stopped"],
        "{o}"
    );

    // Nor was either saved: a restarted coordinator knows the registered worker only.
    let c = restarted(c).await;
    assert_eq!(worker_list(&c.client()).await, expected, "after a restart");
    c.stop().await;
}

/// The state and the session count of `id` as `GET /api/v1/workers/{id}` gives them.
async fn worker_sessions(client: &Client, id: &str) -> (String, u64) {
    let (status, w) = client.get(&format!("/api/v1/workers/{id}")).await;
    assert_eq!(status, 200, "{w}");
    let state = w["state"].as_str().unwrap_or_default().to_owned();
    (state, w["sessions"].as_u64().unwrap_or_default())
}

/// A worker's redundant connection attempt that it drops once another won, or any client on the
/// worker's path that never registers, leaves the worker's registered session alone.
#[tokio::test]
async fn a_connection_that_never_registers_does_not_replace_the_workers_session() {
    // A connection that has not registered within this is cut.
    const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.heartbeat_timeout = TIMEOUT;
    })
    .await;
    let w = connected_worker(&c.ws_url(), "w1").await;
    let client = c.client();
    let untouched = |when: &'static str| {
        let (w, client) = (&w, &client);
        async move {
            assert_eq!(w.handle.registrations(), 1, "{when}");
            assert_eq!(w.handle.state(), ConnState::Connected, "{when}");
            let o = client.overview().await;
            assert_eq!(o["counters"]["sessions_replaced"], 0, "{when}: {o}");
            let listed = worker_sessions(client, "w1").await;
            assert_eq!(listed, ("connected".into(), 1), "{when}");
        }
    };
    // Two that end right after the upgrade: one closes, one drops its socket.
    let url = format!("ws://{}/api/v1/worker/w1/ws", c.addr);
    let upgrade = || async {
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("upgrade");
        ws
    };
    let mut closes = upgrade().await;
    closes.close(None).await.expect("close");
    drop(upgrade().await);
    // Two that stay open: one silent, one that beats and sends a message before registering.
    let mut silent = Raw::connect(&c, "w1").await;
    let opened = tokio::time::Instant::now();
    let mut chatty = Raw::connect(&c, "w1").await;
    chatty
        .send(&serde_json::json!({"type": "heartbeat", "sequence": 5, "timestamp": chrono::Utc::now()}))
        .await;
    assert_eq!(chatty.next_of("heartbeat").await["response_to"], 5);
    chatty
        .send(&serde_json::json!({"type": "task_state", "seq": 1, "task_id": "t-x", "attempt": 1, "state": {}, "timestamp": chrono::Utc::now()}))
        .await;
    let e = chatty.next_error("unexpected", "register first").await;
    assert_eq!(
        (&e["offending_type"], &e["ref_seq"]),
        (&serde_json::json!("task_state"), &serde_json::json!(1)),
        "{e}"
    );
    untouched("while they are open").await;
    // Two whose registrations cannot be taken on this endpoint: refused before the core hears
    // of them, so they displace nothing either.
    let mut other_id = Raw::connect(&c, "w1").await;
    let mut reg = other_id.registration(None, &[]);
    reg["worker_id"] = "w2".into();
    other_id.send(&reg).await;
    assert_eq!(
        other_id.close_code().await,
        Some(4003),
        "another worker's id"
    );
    let mut other_protocol = Raw::connect(&c, "w1").await;
    let mut reg = other_protocol.registration(None, &[]);
    reg["protocol_version"] = 99.into();
    other_protocol.send(&reg).await;
    other_protocol
        .next_error("incompatible_protocol", "protocol")
        .await;
    assert_eq!(
        other_protocol.close_code().await,
        Some(4002),
        "another protocol"
    );
    untouched("after refused registrations").await;
    // The coordinator cuts both for not registering (heartbeats do not keep such a connection),
    // without a close: they were never sessions, so nothing replaced them either.
    assert_eq!(silent.close_code().await, None, "silent");
    assert_eq!(chatty.close_code().await, None, "chatty");
    assert!(opened.elapsed() >= TIMEOUT / 2, "{:?}", opened.elapsed());
    untouched("once they were cut").await;
    // The session works on.
    let ids = client.submit(&[sleep_task(50, 1, 0)]).await;
    client.wait_status(&ids[0], "completed").await;
    untouched("after a task").await;
    w.stop().await.expect("stop");
    c.stop().await;
}

/// The `current_iteration` a `sleep` task last reported, as the coordinator holds it (0 before
/// its first report).
async fn iteration(client: &Client, id: &TaskId) -> u64 {
    let (status, v) = client.get(&format!("/api/v1/tasks/{id}/state")).await;
    assert_eq!(status, 200, "state of {id}: {v}");
    v["state"]["current_iteration"].as_u64().unwrap_or(0)
}

/// [`iteration`], read once the worker holds no report of the task's state unacknowledged:
/// then it is at least the latest step the worker reported. (A report is acknowledged once
/// the coordinator stored it.)
async fn settled_iteration(w: &TestWorker, client: &Client, id: &TaskId) -> u64 {
    wait_for(
        "the task's state reports acknowledged",
        DEADLINE,
        || async {
            let pending = w.handle.outbox.snapshot().into_iter().any(|(_, _, m)| {
            matches!(m.as_ref(), tether_proto::msg::WorkerMsg::TaskState(s) if &s.task_id == id)
        });
            match pending {
                true => None,
                false => Some(iteration(client, id).await),
            }
        },
    )
    .await
}

/// Pause and resume are checked on the worker, not by the task's status (which the
/// coordinator sets itself when asked): the worker shows the task paused, and the task stops
/// (a step under way when the pause came may still end: at most one more), while the other
/// task, of the same steps, moves on; resumed, the worker shows it running and it moves again.
#[tokio::test]
async fn cancel_and_pause_reach_a_running_task() {
    let (_dir, c, w, client) = coordinator_and_worker().await;
    let ids = client
        .submit(&[sleep_task(60_000, 600, 1), sleep_task(60_000, 600, 0)])
        .await;
    let (pausing, cancelling) = (&ids[0], &ids[1]);
    client.wait_status(pausing, "running").await;
    client.wait_status(cancelling, "running").await;
    let (s, _) = client.control(pausing, "pause").await;
    assert_eq!(s, 200);
    wait_for("the task to park at a checkpoint", DEADLINE, || async {
        w.handle
            .active_tasks()
            .iter()
            .any(|t| &t.task_id == pausing && t.paused)
            .then_some(())
    })
    .await;
    let paused_at = settled_iteration(&w, &client, pausing).await;
    let other = settled_iteration(&w, &client, cancelling).await;
    wait_for("the other task to go 5 steps on", DEADLINE, || async {
        (iteration(&client, cancelling).await >= other + 5).then_some(())
    })
    .await;
    let held = settled_iteration(&w, &client, pausing).await;
    assert!(
        held <= paused_at + 1,
        "paused at step {paused_at}, the task went on to {held} while the other went 5 steps"
    );
    let (s, _) = client.control(pausing, "resume").await;
    assert_eq!(s, 200);
    client.wait_status(pausing, "running").await;
    wait_for("the worker to run the task unpaused", DEADLINE, || async {
        w.handle
            .active_tasks()
            .iter()
            .any(|t| &t.task_id == pausing && !t.paused)
            .then_some(())
    })
    .await;
    // Parked, it reported at most one step past `held`: two past it is a step taken after the
    // resume.
    wait_for("the resumed task to move again", DEADLINE, || async {
        (iteration(&client, pausing).await >= held + 2).then_some(())
    })
    .await;
    let (s, v) = client.control(cancelling, "cancel").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "cancelled");
    wait_for(
        "the cancelled task to stop on the worker",
        DEADLINE,
        || async {
            (!w.handle
                .active_tasks()
                .iter()
                .any(|t| &t.task_id == cancelling))
            .then_some(())
        },
    )
    .await;
    let (s, _) = client.control(cancelling, "cancel").await;
    assert_eq!(s, 409, "a terminal task cannot be cancelled again");
    let (s, _) = client.control(pausing, "cancel").await;
    assert_eq!(s, 200);
    w.stop().await.expect("stop");
    c.stop().await;
}

#[tokio::test]
async fn a_task_past_its_timeout_ends_timed_out_with_one_result() {
    let (_dir, c, w, client) = coordinator_and_worker().await;
    let mut spec = TaskSpec::new(
        "command",
        serde_json::json!({"program": "sleep", "args": ["30"]}),
    );
    spec.timeout_ms = Some(300);
    let ids = client.submit(&[spec]).await;
    let t = client.wait_status(&ids[0], "timed_out").await;
    assert_eq!(t["outcome"], "timed_out");
    assert_eq!(client.results(&ids[0]).await.len(), 1);
    wait_for("the worker to be idle", DEADLINE, || async {
        w.handle.active_tasks().is_empty().then_some(())
    })
    .await;
    w.stop().await.expect("stop");
    c.stop().await;
}

#[tokio::test]
async fn bad_query_parameters_get_the_json_error_body() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    for (query, want, code) in [
        ("limit=abc", 400, "bad_request"),
        ("limit=-1", 400, "bad_request"),
        ("order=sideways", 422, "invalid"),
        ("status=bogus", 422, "invalid"),
        // Refused, not cut to the largest page: a client paging by it would take the cut page
        // for the last one.
        ("limit=100001", 422, "invalid"),
    ] {
        let (status, body) = client.get(&format!("/api/v1/tasks?{query}")).await;
        assert_eq!(status, want, "{query}: {body}");
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{query}: {body}"
        );
    }
    c.stop().await;
}

/// `ids=` lists the named tasks (in submission order, an unknown id absent), combined with the
/// other parameters; 128 ids of 128 bytes, every byte percent-encoded, fit the request target
/// the coordinator reads (64 KiB), and more ids are refused with 400 naming the bound. Without
/// the filter, a watch of 5,000 tasks read each with a request of its own.
#[tokio::test]
async fn a_listing_by_ids_returns_those_tasks_and_refuses_more_than_its_bound() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    // No worker: every task stays queued but the one cancelled.
    let specs: Vec<TaskSpec> = (0..6)
        .map(|i| {
            let mut s = TaskSpec::new("sleep", serde_json::json!({}));
            s.task_id = Some(TaskId::parse(&format!("job+{i}")).expect("id"));
            s
        })
        .collect();
    let submitted = client.submit(&specs).await;
    let (s, _) = client.control(&submitted[2], "cancel").await;
    assert_eq!(s, 200);
    let list = |query: String| {
        let client = &client;
        async move {
            let (status, body) = client.get(&format!("/api/v1/tasks?{query}")).await;
            assert_eq!(status, 200, "{query}: {body}");
            let ids: Vec<String> = body
                .as_array()
                .expect("a list")
                .iter()
                .map(|t| t["task_id"].as_str().expect("an id").to_owned())
                .collect();
            (ids, body)
        }
    };
    let named = "ids=job%2B4,job%2B1,nope,job%2B2";
    let (ids, all) = list(named.into()).await;
    assert_eq!(ids, ["job+1", "job+2", "job+4"]);
    let (ids, _) = list(format!("{named}&status=queued")).await;
    assert_eq!(ids, ["job+1", "job+4"]);
    let (ids, _) = list(format!("{named}&order=newest&limit=2")).await;
    assert_eq!(ids, ["job+4", "job+2"]);
    let after = all[0]["submit_seq"].as_u64().expect("seq");
    let (ids, _) = list(format!("{named}&after_seq={after}")).await;
    assert_eq!(ids, ["job+2", "job+4"]);
    // The cancel is the latest change.
    let since = all[1]["updated_at"]
        .as_str()
        .expect("time")
        .replace('+', "%2B");
    let (ids, _) = list(format!("{named}&updated_since={since}")).await;
    assert_eq!(ids, ["job+2"]);
    // 128 ids of 128 bytes, each byte sent as %2B: 48 KiB of request target.
    let filler = |i: usize| format!("{i:03}{}", "+".repeat(125)).replace('+', "%2B");
    let mut many: Vec<String> = (0..127).map(filler).collect();
    many.push("job%2B3".into());
    let (ids, _) = list(format!("ids={}", many.join(","))).await;
    assert_eq!(ids, ["job+3"]);
    many.push(filler(127));
    let (status, body) = client
        .get(&format!("/api/v1/tasks?ids={}", many.join(",")))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("at most 128"), "{body}");
    // Not a task id: as a bad value of another parameter.
    let (status, body) = client.get("/api/v1/tasks?ids=a,b%20c").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid", "{body}");
    c.stop().await;
}

/// A worker told to stop while a task runs that ignores cancellation (it finishes 200 ms in,
/// within the shutdown grace): the result it produces during the grace reaches the
/// coordinator, acknowledged, before the worker's session closes. Without a state directory
/// the result had nowhere else to go: it was lost with the process.
#[tokio::test]
async fn a_stopping_worker_delivers_the_results_its_tasks_produce_during_the_grace() {
    let (_dir, c) = coordinator().await;
    let started = tokio_util::sync::CancellationToken::new();
    let executors = stubborn(&started, std::time::Duration::from_millis(200));
    let w = connected(fast_worker_config(&c.ws_url(), "w1"), executors).await;
    let client = c.client();
    let id = submit_one(&client, "stubborn").await;
    started.cancelled().await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    w.stop().await.expect("clean stop");
    // Nothing to wait for: the stop returned once the result was acknowledged.
    let task = client.task(&id).await;
    assert_eq!(task["status"], "completed", "{task}");
    let results = client.results(&id).await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["body"]["result"]["finished"], true);
    c.stop().await;
}

/// The built-in executors and `stubborn`: cancels `started` when it starts, then is deaf to
/// its own cancel for `runs`, and ends with a result.
fn stubborn(started: &tokio_util::sync::CancellationToken, runs: std::time::Duration) -> Executors {
    let mut executors = Executors::builtin();
    let started = started.clone();
    executors.register(
        "stubborn",
        executor(move |_, _| {
            let started = started.clone();
            async move {
                started.cancel();
                tokio::time::sleep(runs).await;
                Ok(serde_json::json!({ "finished": true }))
            }
        }),
    );
    executors
}

/// Worker `a`, connected to `url`, running a `stubborn` task deaf to its stop for `runs`:
/// `a`, and the task.
async fn stubborn_on_a(
    c: &TestCoordinator,
    url: &str,
    runs: std::time::Duration,
) -> (TestWorker, TaskId) {
    let started = tokio_util::sync::CancellationToken::new();
    let a = connected(fast_worker_config(url, "a"), stubborn(&started, runs)).await;
    let held = submit_one(&c.client(), "stubborn").await;
    started.cancelled().await;
    (a, held)
}

/// A coordinator that keeps a disconnected worker's leases for an hour, in a new temporary
/// directory: the directory, and the coordinator.
async fn keeping_leases() -> (tempfile::TempDir, TestCoordinator) {
    coordinator_with(|cfg| {
        cfg.lost_after = std::time::Duration::from_secs(3600);
    })
    .await
}

/// `held`'s first attempt, on `a`, still holds its lease: not handed on.
async fn assert_still_leased_to_a(client: &Client, held: &TaskId) {
    let t = client.task(held).await;
    assert_eq!(t["status"], "running", "{t}");
    assert_eq!(t["attempts"][0]["worker"], "a", "{t}");
    assert!(t["attempts"][0]["end"].is_null(), "not handed on: {t}");
}

/// A worker whose coordinator is gone stops within its tasks' grace: it does not wait to
/// reconnect to deliver anything.
#[tokio::test]
async fn a_stopping_worker_with_no_coordinator_stops_without_waiting_for_one() {
    let (_dir, c) = coordinator().await;
    let w = connected_worker(&c.ws_url(), "w1").await;
    c.stop().await;
    w.wait_state(|s| s != ConnState::Connected).await;
    tokio::time::timeout(std::time::Duration::from_secs(30), w.stop())
        .await
        .expect("stopped within its bound")
        .expect("clean stop");
}

/// A worker stopped gracefully hands back what it still holds as it goes: with a grace period
/// of an hour, its task resumes at once on another worker from its latest checkpoint
/// (`worker_stopping`, then `worker_stopped`).
#[tokio::test]
async fn a_stopped_worker_s_task_moves_at_once_and_resumes_from_its_checkpoint() {
    let (_dir, c) = keeping_leases().await;
    let a = connected_worker(&c.ws_url(), "a").await;
    let client = c.client();
    // 40 steps of 200 ms, a checkpoint every 2 steps.
    let id = client.submit(&[sleep_task(8_000, 40, 2)]).await.remove(0);
    checkpointed(&client, &id).await;
    a.stop().await.expect("clean stop");
    let t = client.task(&id).await;
    assert_eq!(t["status"], "queued", "moved as a stopped: {t}");
    assert_eq!(t["attempts"][0]["end"], "stopped", "{t}");
    let (_, listed) = client.get("/api/v1/workers/a").await;
    assert_eq!(listed["stopping"], true, "{listed}");
    assert_eq!(listed["leases"], serde_json::json!([]), "{listed}");
    let b = spawn_worker(fast_worker_config(&c.ws_url(), "b"), Executors::builtin());
    let t = client.wait_status(&id, "completed").await;
    assert_eq!(t["attempt"], 2, "{t}");
    assert_eq!(t["attempts"][1]["worker"], "b", "{t}");
    let results = client.results(&id).await;
    assert_eq!(results.len(), 1, "{results:?}");
    let resumed_at = results[0]["body"]["result"]["resumed_at"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        resumed_at >= 2,
        "resumed from a checkpoint, at step {resumed_at}"
    );
    b.stop().await.expect("clean stop");
    c.stop().await;
}

/// Nothing goes to a worker once it said it is stopping, though its slots free up; and a
/// drain that its connection does not survive keeps the worker's lease for the grace period:
/// its results may come back with it.
#[tokio::test]
async fn a_stopping_worker_gets_no_task_and_a_drain_cut_short_keeps_its_lease() {
    let (_dir, c) = keeping_leases().await;
    let relay = Relay::start(c.addr).await;
    // It outlives the drain.
    let (a, held) = stubborn_on_a(&c, &relay.url(), std::time::Duration::from_secs(20)).await;
    let client = c.client();
    let shutdown = a.shutdown.clone();
    shutdown.cancel();
    wait_for("a to say it is stopping", DEADLINE, || async {
        let (_, w) = client.get("/api/v1/workers/a").await;
        (w["stopping"] == true).then_some(())
    })
    .await;
    // a has a free slot (fast_worker_config gives 2): it is not used.
    let next = client.submit(&[sleep_task(10, 1, 0)]).await.remove(0);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let t = client.task(&next).await;
    assert_eq!(t["status"], "queued", "{t}");
    assert_eq!(t["attempts"], serde_json::json!([]), "{t}");
    // The link dies during the drain: no worker_stopped, the lease stays with a.
    relay.cut();
    tokio::time::timeout(DEADLINE, a.join)
        .await
        .expect("a stops within its bound")
        .expect("agent task")
        .expect("clean stop");
    assert_still_leased_to_a(&client, &held).await;
    c.stop().await;
}

/// A task deaf to its stop past the shutdown grace still runs on its worker: the worker does
/// not say `worker_stopped` (the coordinator would hand the task to another worker while it
/// runs here), so the lease stays, for the grace period, as after a crash.
#[tokio::test]
async fn a_worker_whose_task_outlives_the_shutdown_grace_does_not_say_it_stopped() {
    let (_dir, c) = keeping_leases().await;
    let (a, held) = stubborn_on_a(&c, &c.ws_url(), std::time::Duration::from_secs(30)).await;
    let client = c.client();
    let handle = a.handle.clone();
    a.shutdown.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(20), a.join)
        .await
        .expect("a stops within its bound")
        .expect("agent task")
        .expect("clean stop");
    assert_eq!(handle.runner.live_tasks(), 1, "the task outlived the stop");
    let (_, w) = client.get("/api/v1/workers/a").await;
    assert_eq!(w["stopping"], true, "it said it was stopping: {w}");
    assert_still_leased_to_a(&client, &held).await;
    c.stop().await;
}

/// A task that writes a last checkpoint as it is stopped: its worker says `worker_stopped`
/// only once that checkpoint is in (not as soon as every result is), so the task's next
/// attempt resumes from it.
#[tokio::test]
async fn a_stopping_worker_says_it_stopped_only_once_the_last_checkpoint_is_in() {
    const LAST: usize = 4 * 1024 * 1024;
    let (_dir, c) = keeping_leases().await;
    let last_words = executor(|_, ctx| async move {
        ctx.checkpoint(vec![1u8; 10]).await;
        ctx.cancelled().await;
        ctx.checkpoint(vec![2u8; LAST]).await;
        Err(tether_worker::ExecError::Cancelled)
    });
    let a = connected(
        fast_worker_config(&c.ws_url(), "a"),
        builtin_and("last-words", last_words),
    )
    .await;
    let client = c.client();
    let id = submit_one(&client, "last-words").await;
    checkpointed(&client, &id).await;
    a.stop().await.expect("clean stop");
    let t = client.task(&id).await;
    assert_eq!(t["status"], "queued", "{t}");
    assert_eq!(t["latest_checkpoint"]["size"], LAST, "{t}");
    c.stop().await;
}

/// A connected worker's `last_seen` moves with its heartbeats, which its session answers
/// without the core: a worker that sends nothing else is seen all the same, in the list and on
/// its own, and the time of its last frame stays once it is gone.
#[tokio::test]
async fn a_workers_last_seen_moves_with_its_heartbeats_alone() {
    let (_dir, c) = coordinator().await;
    let mut raw = Raw::connect(&c, "beats").await;
    let reg = raw.registration(None, &[]);
    raw.send(&reg).await;
    raw.next_of("registration_ack").await;
    let client = c.client();
    let seen = |w: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(w["last_seen"].as_str().expect("last_seen"))
            .expect("a time")
    };
    let (status, w) = client.get("/api/v1/workers/beats").await;
    assert_eq!(status, 200, "{w}");
    let registered = seen(&w);
    let mut sent = registered;
    for sequence in 1..=3 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        // The stamp keeps milliseconds.
        sent = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 3).into();
        raw.send(
            &serde_json::json!({"type": "heartbeat", "sequence": sequence, "timestamp": sent}),
        )
        .await;
        raw.next_of("heartbeat").await;
    }
    let (_, w) = client.get("/api/v1/workers/beats").await;
    assert!(
        seen(&w) >= sent,
        "{w}: the last heartbeat was sent at {sent}"
    );
    assert!(
        seen(&w) - registered >= chrono::Duration::milliseconds(850),
        "{w}"
    );
    let list: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
    // (A pong answering a ping of the coordinator's in between is a frame too.)
    assert!(seen(&list[0]) >= seen(&w), "{list:?}");
    let _ = raw.ws.close(None).await;
    let gone = wait_for("the worker to be seen disconnected", DEADLINE, || async {
        let (_, w) = client.get("/api/v1/workers/beats").await;
        (w["state"] != "connected").then_some(w)
    })
    .await;
    assert!(seen(&gone) >= sent, "{gone}");
    c.stop().await;
}

/// Told to stop while its link is down, a worker running a task keeps trying to reach the
/// coordinator (`stop_reconnect`) instead of exiting at once: when the link is back within that
/// window it stops properly, and its task is handed on at once, `stopped`, not left for the
/// grace period (here an hour) and then `lost`.
#[tokio::test]
async fn a_worker_stopped_while_cut_off_hands_its_task_back_once_it_reaches_the_coordinator() {
    let (_dir, c) = keeping_leases().await;
    let relay = Relay::start(c.addr).await;
    let mut wcfg = fast_worker_config(&relay.url(), "a");
    wcfg.stop_reconnect = std::time::Duration::from_secs(20);
    let a = connected(wcfg, Executors::builtin()).await;
    let client = c.client();
    let id = client.submit(&[sleep_task(60_000, 60, 0)]).await.remove(0);
    client.wait_status(&id, "running").await;
    relay.cut();
    a.wait_state(|s| s != ConnState::Connected).await;
    a.shutdown.cancel();
    // Still cut off: the worker waits for the coordinator rather than exiting.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert!(
        !a.join.is_finished(),
        "it exited without handing its task back"
    );
    relay.restore();
    tokio::time::timeout(DEADLINE, a.join)
        .await
        .expect("stopped once it reached the coordinator")
        .expect("agent task")
        .expect("a clean stop");
    let t = client.task(&id).await;
    assert_eq!(t["status"], "queued", "{t}");
    assert_eq!(t["attempts"][0]["end"], "stopped", "{t}");
    let (_, w) = client.get("/api/v1/workers/a").await;
    assert_eq!(w["state"], "stopped", "{w}");
    c.stop().await;
}

/// A worker without a state directory gives a `command` task a checkpoint directory all the
/// same (it once gave none: a script's `$TETHER_CHECKPOINT_DIR/n` was `/n`, and a resume
/// started afresh): its checkpoints ship, a resume on another such worker starts from the
/// latest, and the directory goes with the worker.
#[tokio::test]
async fn a_command_task_checkpoints_and_resumes_on_workers_without_a_state_directory() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    let first = connected_worker(&c.ws_url(), "first").await;
    let script = r#"d=${TETHER_CHECKPOINT_DIR:?}; n=$(cat "$d/n" 2>/dev/null || echo 0); echo "start $n"
while [ "$n" -lt 40 ]; do n=$((n+1)); echo "$n" > "$d/n"; sleep 0.1; done; echo "end $n""#;
    let spec = TaskSpec::new(
        "command",
        serde_json::json!({"shell": script, "checkpoint_poll_ms": 50}),
    );
    let ids = client.submit(&[spec]).await;
    wait_for("a checkpoint of the first attempt", DEADLINE, || async {
        let t = client.task(&ids[0]).await;
        (t["latest_checkpoint"]["attempt"] == 1).then_some(())
    })
    .await;
    let workers: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
    let boot = workers[0]["boot_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let pid = std::process::id();
    let scratch = std::env::temp_dir()
        .join(format!("tether-worker-{pid}"))
        .join(&boot);
    assert!(scratch.join("tasks").join(ids[0].as_str()).is_dir());
    // Its user's alone: a task's checkpoint may hold secrets.
    let root = scratch.parent().expect("the process's directory");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(root).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);
    first.stop().await.expect("stop");
    assert!(!scratch.exists(), "the directory goes with the worker");
    // One left by a process gone (killed, it could not remove it) goes at the next start of a
    // worker process; unit-tested in the worker (`agent::tests`).
    let second = spawn_worker(
        fast_worker_config(&c.ws_url(), "second"),
        Executors::builtin(),
    );
    let t = client.wait_status(&ids[0], "completed").await;
    assert_eq!(t["attempts"][1]["worker"], "second", "{t}");
    let results = client.results(&ids[0]).await;
    let out = results[0]["body"]["result"]["stdout_tail"]
        .as_str()
        .unwrap_or_default();
    let from: u32 = out
        .strip_prefix("start ")
        .and_then(|s| s.lines().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out:?}"));
    assert!(
        from > 0 && out.ends_with("end 40\n"),
        "resumed from {from}: {out:?}"
    );
    second.stop().await.expect("stop");
    c.stop().await;
}
