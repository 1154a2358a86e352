//! A task id as an idempotency key: a submission sent again (its reply lost) with the same spec
//! is answered with the task already there and makes nothing; another spec under a kept id is
//! refused, saying what differs; a batch is judged task by task and refused whole.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};
use tether_proto::TaskId;
use tether_testkit::*;

use crate::support::{builtin_and, connected, coordinator, restarted};

/// POSTs `body`, JSON text sent as it is written, to `/api/v1/tasks` of `c`: status and answer.
async fn post_text(c: &TestCoordinator, body: &str) -> (u16, Value) {
    let r = loopback_client(reqwest::Client::builder())
        .post(format!("http://{}/api/v1/tasks", c.addr))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The ids a listing of `client`'s coordinator holds, oldest first.
async fn listed(client: &Client) -> Vec<String> {
    let (status, v) = client.get("/api/v1/tasks?limit=1000").await;
    assert_eq!(status, 200, "{v}");
    v.as_array()
        .expect("a listing")
        .iter()
        .map(|t| t["task_id"].as_str().expect("an id").to_owned())
        .collect()
}

fn ids(v: &Value, key: &str) -> Vec<String> {
    serde_json::from_value(v[key].clone()).unwrap_or_else(|_| panic!("{key} in {v}"))
}

/// The same spec sent twice while queued, laid out otherwise the second time (its defaults
/// spelled out, its config's keys in another order): the second is answered `200` with the
/// task, `existing`, and nothing is made; the worker runs it once; sent a third time once it
/// completed, it is answered the same and not run again.
#[tokio::test]
async fn the_same_spec_sent_again_is_answered_with_the_task_and_runs_once() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    let first = r#"{"task_id": "job-1", "kind": "count", "config": {"a": 1, "b": [2]}}"#;
    let again = r#"{"task_id": "job-1", "kind": "count", "priority": 5, "max_attempts": 3,
                    "requires": [], "tags": {}, "config": { "b": [2],  "a": 1 }}"#;
    let (status, v) = post_text(&c, first).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(ids(&v, "task_ids"), ["job-1"]);
    assert_eq!(ids(&v, "existing"), Vec::<String>::new());
    let (status, v) = post_text(&c, again).await;
    assert_eq!(status, 200, "sent again: {v}");
    assert_eq!(ids(&v, "task_ids"), ["job-1"]);
    assert_eq!(ids(&v, "existing"), ["job-1"]);
    assert_eq!(listed(&client).await, ["job-1"]);

    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let count = executor(move |_, _| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(json!({"ran": true}))
        }
    });
    let w = connected(
        fast_worker_config(&c.ws_url(), "w1"),
        builtin_and("count", count),
    )
    .await;
    let id = TaskId::parse("job-1").expect("id");
    client.wait_status(&id, "completed").await;

    let (status, v) = post_text(&c, first).await;
    assert_eq!(status, 200, "sent again once completed: {v}");
    assert_eq!(ids(&v, "existing"), ["job-1"]);
    let t = client.task(&id).await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(t["attempt"], 1, "one attempt: {t}");
    assert_eq!(client.results(&id).await.len(), 1);
    assert_eq!(listed(&client).await, ["job-1"]);
    let o = client.overview().await;
    assert_eq!(o["queued"], 0, "{o}");
    assert_eq!(o["counters"]["assignments"], 1, "{o}");
    w.stop().await.expect("clean stop");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "run once");
    c.stop().await;
}

/// Another spec under a kept id is refused (`409 conflict`) naming the first field that
/// differs, and the task is left as it was.
#[tokio::test]
async fn another_spec_under_a_kept_id_is_refused_naming_what_differs() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    let spec = json!({"task_id": "job-2", "kind": "nobody-runs-this", "config": {"n": 1}});
    let (status, v) = client.post("/api/v1/tasks", &spec).await;
    assert_eq!(status, 201, "{v}");
    for (field, value, says) in [
        ("priority", json!(1), "`priority` differs (5 there, 1 here)"),
        ("config", json!({"n": 2}), "`config` differs"),
        (
            "kind",
            json!("other-kind"),
            "`kind` differs (nobody-runs-this there, other-kind here)",
        ),
        (
            "max_attempts",
            json!(5),
            "`max_attempts` differs (3 there, 5 here)",
        ),
    ] {
        let mut other = spec.clone();
        other[field] = value;
        let (status, v) = client.post("/api/v1/tasks", &other).await;
        assert_eq!(status, 409, "{field}: {v}");
        assert_eq!(v["error"]["code"], "conflict", "{v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("task job-2 already exists with a different spec")
                && message.contains(says),
            "{field}: {message}"
        );
    }
    let t = client.task(&TaskId::parse("job-2").expect("id")).await;
    assert_eq!(t["spec"]["priority"], 5, "{t}");
    assert_eq!(t["spec"]["config"], json!({"n": 1}), "{t}");
    assert_eq!(listed(&client).await, ["job-2"]);
    c.stop().await;
}

/// The stored spec answers after a restart: the same batch sent again to the restarted
/// coordinator (the reply to the first lost with it) makes nothing, and another spec under
/// one of its ids is refused.
#[tokio::test]
async fn a_submission_sent_again_after_a_coordinator_restart_is_answered_from_the_store() {
    let (_dir, c) = coordinator().await;
    let batch = json!({"tasks": [
        {"task_id": "r-1", "kind": "nobody-runs-this", "config": {"k": "v"}, "tags": {"os": "linux"}},
        {"task_id": "r-2", "kind": "nobody-runs-this", "timeout_ms": 60000, "name": "second"},
    ]});
    let (status, v) = c.client().post("/api/v1/tasks", &batch).await;
    assert_eq!(status, 201, "{v}");
    let before = c.client().task(&TaskId::parse("r-2").expect("id")).await;
    let c = restarted(c).await;
    let client = c.client();
    let (status, v) = client.post("/api/v1/tasks", &batch).await;
    assert_eq!(status, 200, "sent again after the restart: {v}");
    assert_eq!(ids(&v, "task_ids"), ["r-1", "r-2"]);
    assert_eq!(ids(&v, "existing"), ["r-1", "r-2"]);
    assert_eq!(listed(&client).await, ["r-1", "r-2"]);
    let after = client.task(&TaskId::parse("r-2").expect("id")).await;
    assert_eq!(after["submit_seq"], before["submit_seq"], "{after}");
    let mut other = batch.clone();
    other["tasks"][1]["timeout_ms"] = json!(1000);
    let (status, v) = client.post("/api/v1/tasks", &other).await;
    assert_eq!(status, 409, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("task r-2")
            && message.contains("`timeout_ms` differs (60000 ms there, 1000 ms here)"),
        "{message}"
    );
    c.stop().await;
}

/// A batch is judged task by task: sent again whole it makes nothing (`200`); with new tasks
/// among the same ones it makes the new ones (`201`), naming the others `existing`; with one
/// task that differs, or an id given twice, it is refused whole, all or nothing as before.
#[tokio::test]
async fn a_batch_makes_its_new_tasks_answers_its_same_ones_and_is_refused_whole_for_one_differing()
{
    let (_dir, c) = coordinator().await;
    let client = c.client();
    let task =
        |id: &str, n: u64| json!({"task_id": id, "kind": "nobody-runs-this", "config": {"n": n}});
    let batch = json!({"tasks": [task("b-1", 1), task("b-2", 2)]});
    let (status, v) = client.post("/api/v1/tasks", &batch).await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = client.post("/api/v1/tasks", &batch).await;
    assert_eq!(status, 200, "the same batch again: {v}");
    assert_eq!(ids(&v, "existing"), ["b-1", "b-2"]);
    assert_eq!(listed(&client).await, ["b-1", "b-2"]);

    // New ones (one with an id, one without) among the same: only the new are made.
    let fresh = json!({"kind": "nobody-runs-this"});
    let mixed = json!({"tasks": [task("b-3", 3), task("b-1", 1), fresh, task("b-2", 2)]});
    let (status, v) = client.post("/api/v1/tasks", &mixed).await;
    assert_eq!(status, 201, "{v}");
    let answered = ids(&v, "task_ids");
    assert_eq!(answered.len(), 4, "{v}");
    assert_eq!(
        [&answered[0], &answered[1], &answered[3]],
        ["b-3", "b-1", "b-2"]
    );
    assert_eq!(ids(&v, "existing"), ["b-1", "b-2"]);
    let made = answered[2].clone();
    assert_eq!(listed(&client).await, ["b-1", "b-2", "b-3", made.as_str()]);

    // One differing: nothing of the batch is made, not even its new task.
    let differing = json!({"tasks": [task("b-4", 4), task("b-1", 1), task("b-2", 20)]});
    let (status, v) = client.post("/api/v1/tasks", &differing).await;
    assert_eq!(status, 409, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("task b-2 already exists with a different spec: its `config` differs"),
        "{message}"
    );
    // An id given twice in one batch, the same spec or not.
    let twice = json!({"tasks": [task("b-5", 5), task("b-5", 5)]});
    let (status, v) = client.post("/api/v1/tasks", &twice).await;
    assert_eq!(status, 409, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("task b-5 is given twice"), "{message}");
    for absent in ["b-4", "b-5"] {
        let (status, _) = client.get(&format!("/api/v1/tasks/{absent}")).await;
        assert_eq!(status, 404, "{absent} was not made");
    }
    assert_eq!(listed(&client).await, ["b-1", "b-2", "b-3", made.as_str()]);
    c.stop().await;
}

/// A `command` task whose `cwd` is relative is refused at submission (`422 invalid`, by the
/// `command` executor's check), not queued to fail on a worker, where it meant wherever the
/// worker was started.
#[tokio::test]
async fn a_command_task_with_a_relative_cwd_is_refused_at_submission() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    let spec = |cwd: &str| json!({"kind": "command", "config": {"program": "true", "cwd": cwd}});
    let (status, v) = client.post("/api/v1/tasks", &spec("rel/dir")).await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["code"], "invalid", "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message
            .contains("`cwd` \"rel/dir\" is relative; it must be an absolute path on the worker"),
        "{message}"
    );
    assert_eq!(listed(&client).await, Vec::<String>::new());
    let (status, v) = client.post("/api/v1/tasks", &spec("/tmp")).await;
    assert_eq!(status, 201, "an absolute one is taken: {v}");
    c.stop().await;
}
