use std::time::Duration;
use tether_faultproxy::{Direction, Fault, FaultKind};
use tether_testkit::*;

use tether_worker::{ConnState, Executors};

use crate::raw::Raw;
use crate::support::{
    checkpointed, connected, connected_worker, coordinator, coordinator_and_worker, restarted,
    restarted_with,
};

#[tokio::test]
async fn a_result_finished_while_disconnected_is_recorded_once_after_reconnect() {
    let (_dir, c) = coordinator().await;
    let relay = Relay::start(c.addr).await;
    let w = connected_worker(&relay.url(), "w1").await;
    let client = c.client();
    let ids = client.submit(&[sleep_task(1500, 15, 0)]).await;
    wait_for("the worker to run the task", DEADLINE, || async {
        (!w.handle.active_tasks().is_empty()).then_some(())
    })
    .await;
    relay.cut();
    w.wait_state(|s| s != ConnState::Connected).await;
    // The task finishes offline; its result waits in the outbox.
    wait_for("the result to be produced offline", DEADLINE, || async {
        (w.handle.outbox.pending_results().len() == 1).then_some(())
    })
    .await;
    assert_eq!(client.status(&ids[0]).await, "running");
    relay.restore();
    client.wait_status(&ids[0], "completed").await;
    let results = client.results(&ids[0]).await;
    assert_eq!(results.len(), 1, "recorded exactly once: {results:?}");
    assert_eq!(w.handle.executions(), 1);
    assert!(w.handle.stats().reconnects >= 1);
    w.stop().await.expect("stop");
    c.stop().await;
}

#[tokio::test]
async fn a_lost_worker_s_task_resumes_elsewhere_from_its_checkpoint_and_its_late_result_is_stale() {
    let (_dir, c) = coordinator().await;
    let relay = Relay::start(c.addr).await;
    let a = connected_worker(&relay.url(), "a").await;
    let client = c.client();
    // 40 steps of 200 ms, a checkpoint every 2 steps.
    let ids = client.submit(&[sleep_task(8_000, 40, 2)]).await;
    let id = &ids[0];
    checkpointed(&client, id).await;
    relay.cut();
    // Worker b takes over once a is declared lost (after the grace period).
    let b = spawn_worker(fast_worker_config(&c.ws_url(), "b"), Executors::builtin());
    let t = client.wait_status(id, "completed").await;
    assert_eq!(t["attempt"], 2);
    assert_eq!(t["attempts"][0]["worker"], "a");
    assert_eq!(t["attempts"][0]["end"], "lost");
    assert_eq!(t["attempts"][1]["worker"], "b");
    let results = client.results(id).await;
    let counted: Vec<_> = results.iter().filter(|r| r["stale"] == false).collect();
    assert_eq!(counted.len(), 1);
    assert_eq!(counted[0]["worker"], "b");
    let resumed_at = counted[0]["body"]["result"]["resumed_at"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        resumed_at >= 2,
        "resumed from a checkpoint, at step {resumed_at}"
    );
    // a finishes its stale attempt offline and delivers it when it comes back.
    wait_for("a's stale result to be produced", DEADLINE, || async {
        (a.handle.outbox.pending_results().len() == 1).then_some(())
    })
    .await;
    relay.restore();
    wait_for(
        "a's late result to be recorded as stale",
        DEADLINE,
        || async {
            let r = client.results(id).await;
            (r.len() == 2).then_some(())
        },
    )
    .await;
    let results = client.results(id).await;
    let stale: Vec<_> = results.iter().filter(|r| r["stale"] == true).collect();
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0]["worker"], "a");
    assert_eq!(stale[0]["attempt"], 1);
    assert_eq!(
        client.status(id).await,
        "completed",
        "a stale result changes nothing"
    );
    wait_for("a's outbox to drain", DEADLINE, || async {
        a.handle.outbox.is_empty().then_some(())
    })
    .await;
    let o = client.overview().await;
    assert_eq!(o["counters"]["results_stale"], 1);
    assert_eq!(o["counters"]["workers_lost"], 1);
    a.stop().await.expect("stop");
    b.stop().await.expect("stop");
    c.stop().await;
}

/// A worker cut off past the grace period finishes its task offline, and no other worker
/// took the task meanwhile: when it comes back, the lease goes back to it and its finished
/// work is counted. The task is not run again, and no result is kept stale.
#[tokio::test]
async fn a_lost_worker_back_with_its_task_finished_has_it_counted_not_run_again() {
    let (_dir, c) = coordinator().await;
    let relay = Relay::start(c.addr).await;
    let a = connected_worker(&relay.url(), "a").await;
    let client = c.client();
    let ids = client.submit(&[sleep_task(1_500, 15, 0)]).await;
    let id = &ids[0];
    wait_for("the worker to run the task", DEADLINE, || async {
        (!a.handle.active_tasks().is_empty()).then_some(())
    })
    .await;
    relay.cut();
    // Declared lost (the grace period ran out): the task waits in the queue for a worker.
    wait_for(
        "the worker to be lost and its task queued",
        DEADLINE,
        || async {
            let o = client.overview().await;
            (o["counters"]["workers_lost"] == 1 && client.status(id).await == "queued")
                .then_some(())
        },
    )
    .await;
    wait_for("the result to be produced offline", DEADLINE, || async {
        (a.handle.outbox.pending_results().len() == 1).then_some(())
    })
    .await;
    relay.restore();
    let t = client.wait_status(id, "completed").await;
    assert_eq!(t["attempt"], 1, "{t}");
    assert_eq!(t["attempts"].as_array().map(Vec::len), Some(1), "{t}");
    assert_eq!(t["attempts"][0]["worker"], "a");
    assert_eq!(t["attempts"][0]["end"], "completed");
    let results = client.results(id).await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["stale"], false);
    assert_eq!(results[0]["worker"], "a");
    assert_eq!(a.handle.executions(), 1, "run once");
    let o = client.overview().await;
    assert_eq!(o["counters"]["leases_restored"], 1, "{o}");
    assert_eq!(o["counters"]["results_stale"], 0, "{o}");
    assert_eq!(o["counters"]["results_recorded"], 1, "{o}");
    a.stop().await.expect("stop");
    c.stop().await;
}

/// `n` bytes that do not compress, as a real checkpoint's often do not (xorshift64*).
fn noise(n: u64) -> Vec<u8> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// FNV-1a: says whether two byte strings are the same.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Writes a checkpoint of `config.bytes` and then runs until cancelled; resumed from a
/// checkpoint, it ends at once with the checkpoint's length and digest; a later attempt
/// without one ends at once too.
fn big_checkpoint_executors() -> Executors {
    let mut e = Executors::builtin();
    e.register(
        "big-checkpoint",
        executor(|input, ctx| async move {
            if let Some(cp) = ctx.latest_checkpoint() {
                return Ok(serde_json::json!({
                    "resumed": true,
                    "len": cp.len(),
                    "digest": digest(&cp).to_string(),
                }));
            }
            if input.attempt.0 > 1 {
                return Ok(serde_json::json!({ "resumed": false }));
            }
            ctx.checkpoint(noise(input.config["bytes"].as_u64().unwrap_or(0)))
                .await;
            ctx.cancelled().await;
            Err(tether_worker::ExecError::Cancelled)
        }),
    );
    e
}

/// The size of the checkpoint the fetch tests hand over: 6.7 MB as base64, more than six frames
/// of the 1 MiB their coordinator takes.
const BYTES: u64 = 5_000_000;

/// A coordinator taking 1 MiB frames, in `dir`.
fn small_frames(dir: &std::path::Path) -> tether_coordinator::CoordinatorConfig {
    let mut cfg = fast_coordinator_config(dir.to_owned());
    cfg.max_frame = 1024 * 1024;
    cfg
}

/// A task that worker a checkpointed with [`BYTES`] and left (a stopped).
async fn a_task_checkpointed_and_left(c: &TestCoordinator) -> tether_proto::TaskId {
    let a = connected(
        fast_worker_config(&c.ws_url(), "a"),
        big_checkpoint_executors(),
    )
    .await;
    let client = c.client();
    let id = client
        .submit(&[tether_proto::TaskSpec::new(
            "big-checkpoint",
            serde_json::json!({ "bytes": BYTES }),
        )])
        .await
        .remove(0);
    wait_for(
        "the checkpoint to reach the coordinator",
        DEADLINE,
        || async {
            let t = client.task(&id).await;
            (t["latest_checkpoint"]["size"] == BYTES).then_some(())
        },
    )
    .await;
    a.stop().await.expect("stop");
    id
}

/// Worker b, behind a fault proxy whose link towards it carries 2 MB/s: a checkpoint's pieces
/// take seconds to arrive.
async fn worker_b_on_a_slow_link(c: &TestCoordinator) -> (tether_faultproxy::Proxy, TestWorker) {
    let proxy = crate::faults::proxy_in_front(c, 5).await;
    let slow = Fault::new(
        "slow",
        FaultKind::Bandwidth {
            bytes_per_sec: 2_000_000,
        },
        Direction::Downstream,
    );
    // Kept until the proxy goes (a guard dropped here would remove the fault).
    std::mem::forget(proxy.add_fault(slow).await.expect("fault"));
    let b = spawn_worker(
        fast_worker_config(&format!("ws://{}", proxy.listen_addr()), "b"),
        big_checkpoint_executors(),
    );
    (proxy, b)
}

/// Checkpoint bytes coordinator `c` has served to fetches since it started (its own count:
/// the metrics recorder is the test process's, shared by the tests running beside this one).
async fn served(c: &TestCoordinator) -> u64 {
    c.client().overview().await["counters"]["checkpoint_bytes_served"]
        .as_u64()
        .expect("a count")
}

/// The most checkpoint bytes a worker has asked for and not received at any moment: its window
/// of `FETCH_WINDOW` (4) pieces of `FETCH_PIECE` (the upload's piece) at most, one fetch
/// running (crates/worker/src/fetch.rs, private to the worker).
const IN_FLIGHT: u64 = 4 * tether_proto::codec::CHECKPOINT_PIECE as u64;

/// Waits until `c` served more than the worker's first window of pieces ([`IN_FLIGHT`]): the
/// worker has taken one at least, and asked for the next.
async fn wait_first_pieces_taken(c: &TestCoordinator) {
    wait_for("the first pieces to be taken", DEADLINE, || async {
        (served(c).await > IN_FLIGHT).then_some(())
    })
    .await;
}

/// The task completed on b at its second attempt, resumed from exactly the checkpoint a wrote.
async fn assert_resumed_on_b_from_the_whole_checkpoint(client: &Client, id: &tether_proto::TaskId) {
    let t = client.wait_status(id, "completed").await;
    assert_eq!(t["attempt"], 2, "{t}");
    assert_eq!(t["attempts"][1]["worker"], "b", "{t}");
    let results = client.results(id).await;
    let r = &results[0]["body"]["result"];
    assert_eq!(r["resumed"], true, "{results:?}");
    assert_eq!(r["len"], BYTES, "{results:?}");
    assert_eq!(
        r["digest"],
        digest(&noise(BYTES)).to_string(),
        "{results:?}"
    );
}

#[tokio::test]
async fn a_checkpoint_larger_than_a_message_follows_its_task_in_pieces_through_a_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator_with(small_frames(dir.path()), None).await;
    let id = a_task_checkpointed_and_left(&c).await;
    let (proxy, b) = worker_b_on_a_slow_link(&c).await;
    wait_first_pieces_taken(&c).await;
    let at_cut = served(&c).await;
    proxy.down().await;
    b.wait_state(|s| s != ConnState::Connected).await;
    proxy.up().await.expect("up");
    assert_resumed_on_b_from_the_whole_checkpoint(&c.client(), &id).await;
    let sessions = b.handle.registrations();
    assert!(sessions >= 2, "{sessions} sessions: b never came back");
    let served = served(&c).await;
    // The pieces lost in the cut were asked for again in the next session...
    assert!(
        served > BYTES,
        "{served} bytes served: none was served again after the cut"
    );
    // ...and only they: the fetch went on from where it was. Served twice is at most what b
    // had asked for and not received when a session ended, its window ([`IN_FLIGHT`]) per cut:
    // less than the more than `IN_FLIGHT` served before the cut (`wait_first_pieces_taken`),
    // all of which a fetch started over would ask for again.
    let (again, cuts) = (served - BYTES, sessions - 1);
    assert!(
        again <= cuts * IN_FLIGHT,
        "{again} bytes served twice, more than the {IN_FLIGHT} in flight at each of {cuts} \
         cuts ({at_cut} served before the cut): the fetch started over"
    );
    b.stop().await.expect("stop");
    c.stop().await;
}

#[tokio::test]
async fn a_fetch_under_way_when_the_coordinator_restarts_goes_on_from_where_it_was() {
    fetch_through_a_restart(1024 * 1024).await;
}

/// The coordinator comes back taking frames of 128 KiB: the pieces b asked for before (256
/// KiB, queued in its outbox and asked again) no longer fit in one. They are served shorter
/// and b asks for the rest; they used to be refused, and the task started afresh.
#[tokio::test]
async fn a_fetch_under_way_when_the_coordinator_restarts_with_smaller_frames_goes_on() {
    fetch_through_a_restart(128 * 1024).await;
}

/// A fetch under way on b when its coordinator restarts, taking frames of `max_frame` after.
async fn fetch_through_a_restart(max_frame: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator_with(small_frames(dir.path()), None).await;
    let addr = c.addr;
    let id = a_task_checkpointed_and_left(&c).await;
    let (_proxy, b) = worker_b_on_a_slow_link(&c).await;
    wait_first_pieces_taken(&c).await;
    c.stop().await;
    b.wait_state(|s| s != ConnState::Connected).await;
    let mut cfg = small_frames(dir.path());
    cfg.max_frame = max_frame;
    let c = spawn_coordinator_with(cfg, Some(addr)).await;
    // The restarted coordinator kept b's lease (attempt 2) and its checkpoint, and served b
    // what it still lacked.
    assert_resumed_on_b_from_the_whole_checkpoint(&c.client(), &id).await;
    let after = served(&c).await;
    assert!(
        after > 0 && after < BYTES,
        "{after} bytes served after the restart: only what b still lacked"
    );
    assert_eq!(b.handle.executions(), 1);
    b.stop().await.expect("stop");
    c.stop().await;
}

#[tokio::test]
async fn a_restarted_coordinator_keeps_tasks_and_leases_and_records_each_result_once() {
    let (dir, c, w, client) = coordinator_and_worker().await;
    let addr = c.addr;
    let ids = client
        .submit(&[
            sleep_task(2_000, 20, 0),
            sleep_task(2_000, 20, 0),
            sleep_task(100, 1, 0),
        ])
        .await;
    client.wait_status(&ids[0], "running").await;
    c.stop().await;
    w.wait_state(|s| s != ConnState::Connected).await;
    let c =
        spawn_coordinator_with(fast_coordinator_config(dir.path().to_owned()), Some(addr)).await;
    let client = c.client();
    for id in &ids {
        client.wait_status(id, "completed").await;
        assert_eq!(client.results(id).await.len(), 1);
    }
    // The leased tasks continued on the same worker: one execution each.
    assert_eq!(w.handle.executions(), 3);
    let t = client.task(&ids[0]).await;
    assert_eq!(t["attempt"], 1, "{t}");
    w.stop().await.expect("stop");
    c.stop().await;
}

/// The ids of a task's stored checkpoints, as the API lists them.
async fn checkpoint_ids(client: &Client, task: &tether_proto::TaskId) -> Vec<String> {
    let (status, list) = client
        .get(&format!("/api/v1/tasks/{task}/checkpoints"))
        .await;
    assert_eq!(status, 200, "{list}");
    let mut ids: Vec<String> = list
        .as_array()
        .or_else(|| list["checkpoints"].as_array())
        .expect("a checkpoint list")
        .iter()
        .filter_map(|c| c["checkpoint_id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn only_the_latest_checkpoints_of_a_task_are_kept_across_a_coordinator_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.checkpoints_kept = 2;
    let c = spawn_coordinator_with(cfg.clone(), None).await;
    let w = connected_worker(&c.ws_url(), "w1").await;
    let client = c.client();
    // 16 steps of 250 ms, a checkpoint after each but the last: 15 checkpoints.
    let id = client.submit(&[sleep_task(4_000, 16, 1)]).await.remove(0);
    wait_for("two checkpoints stored", DEADLINE, || async {
        (checkpoint_ids(&client, &id).await.len() == 2).then_some(())
    })
    .await;
    let before = checkpoint_ids(&client, &id).await;
    // Restarted, the coordinator still knows which checkpoints it holds, so it goes on
    // removing the oldest: the two from before the restart do not stay behind.
    let c = restarted_with(c, cfg).await;
    let client = c.client();
    client.wait_status(&id, "completed").await;
    let kept = checkpoint_ids(&client, &id).await;
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(
        kept.iter().all(|k| !before.contains(k)),
        "{before:?} {kept:?}"
    );
    let latest = client.task(&id).await["latest_checkpoint"]["checkpoint_id"].clone();
    assert!(
        kept.iter().any(|k| latest == k.as_str()),
        "{latest} {kept:?}"
    );
    // What was removed is gone, bytes and all.
    let (status, _) = client
        .get(&format!("/api/v1/tasks/{id}/checkpoints/{}", before[0]))
        .await;
    assert_eq!(status, 404);
    // A kept one is served under its own task only.
    let other = client.submit(&[sleep_task(10, 1, 0)]).await.remove(0);
    for (task, want) in [(&id, 200), (&other, 404)] {
        let (status, _) = client
            .get(&format!("/api/v1/tasks/{task}/checkpoints/{}", kept[0]))
            .await;
        assert_eq!(status, want, "checkpoint {} under task {task}", kept[0]);
    }
    w.stop().await.expect("stop");
    c.stop().await;
}

#[tokio::test]
async fn retention_removes_old_finished_tasks_for_good_and_keeps_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.retention = Some(Duration::from_millis(500));
    let c = spawn_coordinator_with(cfg.clone(), None).await;
    let w = spawn_worker(fast_worker_config(&c.ws_url(), "w1"), Executors::builtin());
    let client = c.client();
    // A short task with a checkpoint, and a long one that is still running at the cutoff.
    let ids = client
        .submit(&[sleep_task(100, 2, 1), sleep_task(30_000, 300, 0)])
        .await;
    let (short, long) = (&ids[0], &ids[1]);
    client.wait_status(short, "completed").await;
    client.wait_status(long, "running").await;
    wait_for(
        "the finished task to expire",
        Duration::from_secs(20),
        || async { (client.get(&format!("/api/v1/tasks/{short}")).await.0 == 404).then_some(()) },
    )
    .await;
    assert_eq!(
        client.get(&format!("/api/v1/tasks/{short}/result")).await.0,
        404
    );
    assert_eq!(
        client
            .get(&format!("/api/v1/tasks/{short}/checkpoints"))
            .await
            .0,
        404
    );
    assert_eq!(client.status(long).await, "running");
    let o = client.overview().await;
    assert_eq!(o["counters"]["tasks_expired"], 1, "{o}");

    // Gone from the database too: a restart does not bring it back.
    let c = restarted_with(c, cfg).await;
    let client = c.client();
    assert_eq!(client.get(&format!("/api/v1/tasks/{short}")).await.0, 404);
    assert_eq!(client.status(long).await, "running");
    let (_, list) = client.get("/api/v1/tasks").await;
    let listed: Vec<&str> = list
        .as_array()
        .or_else(|| list["tasks"].as_array())
        .expect("a task list")
        .iter()
        .filter_map(|t| t["task_id"].as_str())
        .collect();
    assert_eq!(listed, [long.as_str()]);
    w.stop().await.expect("stop");
    c.stop().await;
}

#[tokio::test]
async fn a_task_submitted_again_under_a_removed_id_runs_on_the_worker_that_ran_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.retention = Some(Duration::from_millis(300));
    let c = spawn_coordinator_with(cfg.clone(), None).await;
    // One worker: it runs both tasks of the id, and remembers finishing the first's attempt.
    let w = spawn_worker(fast_worker_config(&c.ws_url(), "w1"), Executors::builtin());
    let spec = tether_proto::TaskSpec {
        task_id: Some(tether_proto::TaskId::parse("nightly").expect("id")),
        ..sleep_task(20, 1, 0)
    };
    let client = c.client();
    let id = client.submit(std::slice::from_ref(&spec)).await.remove(0);
    client.wait_status(&id, "completed").await;
    wait_for(
        "the finished task to expire",
        Duration::from_secs(20),
        || async { (client.get(&format!("/api/v1/tasks/{id}")).await.0 == 404).then_some(()) },
    )
    .await;
    // What retention removed is remembered across a restart.
    let mut cfg = cfg;
    cfg.retention = None;
    let c = restarted_with(c, cfg).await;
    let client = c.client();
    assert_eq!(client.submit(&[spec]).await, std::slice::from_ref(&id));
    let t = client.wait_status(&id, "completed").await;
    assert_eq!(t["attempt"], 2, "{t}");
    let (_, results) = client.get(&format!("/api/v1/tasks/{id}/result")).await;
    let attempts: Vec<&serde_json::Value> = results
        .as_array()
        .or_else(|| results["results"].as_array())
        .expect("results")
        .iter()
        .map(|r| &r["attempt"])
        .collect();
    assert_eq!(attempts, [2], "{results}");
    w.stop().await.expect("stop");
    c.stop().await;
}

/// The `checkpoint` announcing `id` (one piece of one byte) of `task` at attempt 1, and that
/// piece, as messages `seq` and `seq + 1`.
fn one_byte_checkpoint(seq: u64, task: &tether_proto::TaskId, id: &str) -> [serde_json::Value; 2] {
    let ts = chrono::Utc::now();
    [
        serde_json::json!({"type": "checkpoint", "seq": seq, "task_id": task, "attempt": 1,
            "checkpoint_id": id, "size": 1, "chunks": 1, "timestamp": ts}),
        serde_json::json!({"type": "checkpoint_data", "seq": seq + 1, "task_id": task,
            "attempt": 1, "checkpoint_id": id, "chunk": 0, "data": "eA==", "timestamp": ts}),
    ]
}

/// Sends checkpoint `id` and its piece; returns the dispositions of their acks.
async fn upload(m: &mut Raw, seq: u64, task: &tether_proto::TaskId, id: &str) -> Vec<String> {
    for msg in one_byte_checkpoint(seq, task, id) {
        m.send(&msg).await;
    }
    let acks = m
        .next_of_each(&["checkpoint_ack", "checkpoint_data_ack"])
        .await;
    acks.into_iter()
        .map(|a| {
            assert_eq!(a["checkpoint_id"], id, "{a}");
            a["disposition"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

/// A worker replays a checkpoint the coordinator completed and has pruned since (only the
/// last 3 are kept): it is a duplicate, before a restart of the coordinator and after, and the
/// latest checkpoint and the kept ones stay as they were.
#[tokio::test]
async fn a_replayed_checkpoint_pruned_since_is_a_duplicate_across_a_coordinator_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = fast_coordinator_config(dir.path().to_owned());
    assert_eq!(cfg.checkpoints_kept, 3);
    let c = spawn_coordinator_with(cfg.clone(), None).await;
    let client = c.client();
    let mut m = Raw::connect(&c, "replayer").await;
    let reg = m.registration(None, &["replayer-only"]);
    m.send(&reg).await;
    m.next_of("registration_ack").await;
    let mut spec = sleep_task(50, 1, 0);
    spec.requires = vec!["replayer-only".into()];
    let t = client.submit(&[spec]).await.remove(0);
    assert_eq!(m.next_of("task_assignment").await["task_id"], t.as_str());
    for (i, id) in ["c-x1", "c-x2", "c-x3", "c-x4"].into_iter().enumerate() {
        let got = upload(&mut m, 10 + 2 * i as u64, &t, id).await;
        assert_eq!(got, ["recorded", "recorded"], "{id}");
    }
    let kept = ["c-x2", "c-x3", "c-x4"];
    assert_eq!(checkpoint_ids(&client, &t).await, kept);
    let latest = |task: serde_json::Value| task["latest_checkpoint"]["checkpoint_id"].clone();
    assert_eq!(latest(client.task(&t).await), "c-x4");

    assert_eq!(
        upload(&mut m, 10, &t, "c-x1").await,
        ["duplicate", "duplicate"]
    );
    assert_eq!(latest(client.task(&t).await), "c-x4");
    assert_eq!(checkpoint_ids(&client, &t).await, kept, "nothing deleted");

    // Restarted, the coordinator still knows c-x1 for a checkpoint of this lease.
    drop(m);
    let c = restarted_with(c, cfg).await;
    let client = c.client();
    let mut m = Raw::connect(&c, "replayer").await;
    let mut reg = m.registration(None, &["replayer-only"]);
    reg["inventory"] = serde_json::json!({"running": [{"task_id": t, "attempt": 1}]});
    m.send(&reg).await;
    let ack = m.next_of("registration_ack").await;
    assert_eq!(ack["directives"][0]["action"], "continue", "{ack}");
    assert_eq!(
        upload(&mut m, 10, &t, "c-x1").await,
        ["duplicate", "duplicate"]
    );
    assert_eq!(latest(client.task(&t).await), "c-x4");
    assert_eq!(checkpoint_ids(&client, &t).await, kept, "nothing deleted");
    // A new one is taken as before, and prunes the oldest kept.
    assert_eq!(
        upload(&mut m, 30, &t, "c-x5").await,
        ["recorded", "recorded"]
    );
    assert_eq!(checkpoint_ids(&client, &t).await, ["c-x3", "c-x4", "c-x5"]);
    assert_eq!(latest(client.task(&t).await), "c-x5");
    c.stop().await;
}

/// A second coordinator on a data directory in use is refused at start, naming the first, and
/// the first serves on untouched; once the first has stopped, the directory is free again.
#[tokio::test]
async fn a_second_coordinator_on_a_data_directory_in_use_is_refused() {
    let (dir, c, w, client) = coordinator_and_worker().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let second = tokio::time::timeout(
        DEADLINE,
        tether_coordinator::run_with(
            listener,
            fast_coordinator_config(dir.path().to_owned()),
            tokio_util::sync::CancellationToken::new(),
            |_| panic!("a second coordinator started on a directory in use"),
        ),
    )
    .await
    .expect("refused at once");
    let said = second.expect_err("refused").to_string();
    assert!(
        said.contains("in use by another coordinator")
            && said.contains(&format!("pid {}", std::process::id())),
        "{said}"
    );
    // The first serves on: its worker still connected, its tasks run.
    let id = client.submit(&[sleep_task(20, 2, 0)]).await.remove(0);
    client.wait_status(&id, "completed").await;
    let workers: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
    assert_eq!(workers[0]["state"], "connected", "{workers:?}");
    w.stop().await.expect("clean stop");
    c.stop().await;
    // Stopped, it leaves the directory free.
    let again = spawn_coordinator(dir.path().to_owned()).await;
    assert_eq!(again.client().task(&id).await["status"], "completed");
    again.stop().await;
}

/// The state of `id` in the worker list.
async fn worker_state(client: &Client, id: &str) -> String {
    let ws: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
    ws.iter()
        .find(|w| w["worker_id"] == id)
        .and_then(|w| w["state"].as_str())
        .unwrap_or("unlisted")
        .to_owned()
}

/// A worker stopped gracefully is `stopped` at once, not lost after the grace period; one cut
/// off is lost once. A restart keeps both as they were: neither comes back `disconnected` to
/// be lost (and counted) again.
#[tokio::test]
async fn stopped_and_lost_workers_stay_so_and_are_not_lost_again_after_a_restart() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    let stopper = connected_worker(&c.ws_url(), "stopper").await;
    let gone = connected_worker(&c.ws_url(), "gone").await;
    stopper.stop().await.expect("clean stop");
    assert_eq!(worker_state(&client, "stopper").await, "stopped");
    // Cut off without a word: lost after the grace period (3 s).
    gone.join.abort();
    wait_for("the cut-off worker to be lost", DEADLINE, || async {
        (worker_state(&client, "gone").await == "lost").then_some(())
    })
    .await;
    let o = client.overview().await;
    assert_eq!(o["counters"]["workers_lost"], 1, "{o}");
    assert_eq!(o["workers"]["stopped"], 1, "{o}");
    assert_eq!(worker_state(&client, "stopper").await, "stopped");

    let c = restarted(c).await;
    let client = c.client();
    assert_eq!(worker_state(&client, "stopper").await, "stopped");
    assert_eq!(worker_state(&client, "gone").await, "lost");
    // Past the grace period and a few sweeps: nothing lost again.
    tokio::time::sleep(std::time::Duration::from_millis(3_600)).await;
    let o = client.overview().await;
    assert_eq!(o["counters"]["workers_lost"], 0, "{o}");
    assert_eq!(worker_state(&client, "gone").await, "lost");
    // A stopped worker started again is connected, as any.
    let again = connected_worker(&c.ws_url(), "stopper").await;
    assert_eq!(worker_state(&client, "stopper").await, "connected");
    again.stop().await.expect("clean stop");
    c.stop().await;
}

/// A worker connected when the coordinator stops was there until it stopped: after the
/// restart its `last_seen` is the stop, not its registration, which was its record's last save;
/// and its statistics are its latest report's, which telemetry alone saves only every 5 min.
#[tokio::test]
async fn a_worker_connected_at_a_stop_is_last_seen_at_the_stop_after_the_restart() {
    let (dir, c) = coordinator().await;
    // A raw worker: it registers, reports once, then says nothing, and does not come back
    // after the stop.
    let mut raw = Raw::connect(&c, "quiet").await;
    raw.send(&raw.registration(None, &[])).await;
    raw.next_of("registration_ack").await;
    let stats = tether_proto::task::ConnStats {
        reconnects: 7,
        ..Default::default()
    };
    let report = tether_proto::msg::WorkerMsg::Telemetry(tether_proto::msg::Telemetry {
        seq: tether_proto::Seq(1),
        connection_stats: stats,
        metrics: serde_json::Value::Null.into(),
        timestamp: chrono::Utc::now(),
    });
    raw.send(&serde_json::to_value(report).expect("json")).await;
    raw.next_of("telemetry_ack").await;
    let before: Vec<serde_json::Value> = c.client().get_as("/api/v1/workers").await;
    let reported = before[0]["stats"]["reported_at"].clone();
    assert!(reported.is_string(), "{before:?}");
    let client = c.client();
    let registered = wait_for("the registration", DEADLINE, || async {
        let workers: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
        workers
            .first()
            .map(|w| w["last_seen"].as_str().unwrap_or("").to_owned())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let stopped = chrono::Utc::now();
    let addr = c.addr;
    c.stop().await;
    drop(raw);
    let c =
        spawn_coordinator_with(fast_coordinator_config(dir.path().to_owned()), Some(addr)).await;
    let workers: Vec<serde_json::Value> = c.client().get_as("/api/v1/workers").await;
    let at = |v: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_default()).expect("a time")
    };
    let seen = at(&workers[0]["last_seen"]);
    assert_eq!(workers[0]["state"], "disconnected", "{workers:?}");
    assert!(
        seen >= stopped - chrono::Duration::milliseconds(500),
        "last seen {seen}, registered {registered}, stopped {stopped}"
    );
    assert_eq!(workers[0]["disconnected_at"], workers[0]["last_seen"]);
    assert_eq!(workers[0]["stats"]["reconnects"], 7, "{workers:?}");
    // When it was reported, too: the table shows how old the statistics are.
    assert_eq!(workers[0]["stats"]["reported_at"], reported, "{workers:?}");
    c.stop().await;
}

/// A pause holds across the lease's end and a restart: a paused task whose worker stops is
/// not taken by the other worker there, nor after a coordinator restart, until it is resumed;
/// then it runs its next attempt to completion.
#[tokio::test]
async fn a_paused_task_whose_worker_stops_waits_paused_through_a_restart_until_resumed() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    let mut one = fast_worker_config(&c.ws_url(), "one");
    one.capabilities = vec!["special".into()];
    let first = connected(one, Executors::builtin()).await;
    let mut spec = sleep_task(2_000, 20, 0);
    spec.requires = vec!["special".into()];
    let ids = client.submit(&[spec]).await;
    wait_for("the task to run", DEADLINE, || async {
        (client.status(&ids[0]).await == "running").then_some(())
    })
    .await;
    let (status, _) = client.control(&ids[0], "pause").await;
    assert_eq!(status, 200);
    client.wait_status(&ids[0], "paused").await;
    // Another worker that could run it is there; the paused task's worker stops.
    let mut two = fast_worker_config(&c.ws_url(), "two");
    two.capabilities = vec!["special".into()];
    let second = connected(two, Executors::builtin()).await;
    first.stop().await.expect("stop");
    let t = client.task(&ids[0]).await;
    assert_eq!(t["attempts"][0]["end"], "stopped", "{t}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client.status(&ids[0]).await, "paused");
    assert_eq!(second.handle.executions(), 0, "a paused task is not run");
    // Held through a restart.
    let c = restarted(c).await;
    let client = c.client();
    second.wait_state(|s| s == ConnState::Connected).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client.status(&ids[0]).await, "paused");
    assert_eq!(second.handle.executions(), 0, "a paused task is not run");
    let (status, t) = client.control(&ids[0], "resume").await;
    assert_eq!((status, t["status"].as_str()), (200, Some("queued")), "{t}");
    let t = client.wait_status(&ids[0], "completed").await;
    assert_eq!(
        (t["attempt"].as_u64(), t["attempts"][1]["worker"].as_str()),
        (Some(2), Some("two")),
        "{t}"
    );
    assert_eq!(second.handle.executions(), 1);
    second.stop().await.expect("stop");
    c.stop().await;
}
