//! A task's `env` values (where `tether submit --env` puts the secrets a task needs) are shown
//! to the admin scope only: a read token sees their names with each value replaced, in a
//! task, a listing and the event stream; the worker gets them as given.

use serde_json::{Value, json};
use tether_coordinator::auth::{ApiTokens, Scope};
use tether_coordinator::model::REDACTED;
use tether_proto::TaskSpec;
use tether_proto::auth::Secret;
use tether_testkit::*;
use tether_worker::{ConnState, Executors};

use crate::dashboard::next_event;

const ADMIN: &str = "admin-token-for-tests";
const READ: &str = "read-token-for-tests";
const VALUE: &str = "s3cret-value-of-22-chars";

/// A task that prints the length of `$API_KEY` (not the key: outputs are not filtered), with
/// the key in its `env` beside a setting that is no secret.
fn keyed_task() -> TaskSpec {
    TaskSpec::new(
        "command",
        json!({
            "shell": "printf %s \"${#API_KEY}\"",
            "env": {"API_KEY": VALUE, "MODE": "fast"},
        }),
    )
}

/// The event stream opened with a read token, and its first event, the snapshot.
async fn read_events(base: &str) -> (reqwest::Response, String, Value) {
    let mut events = loopback_client(reqwest::Client::builder())
        .get(format!("{base}/api/v1/events"))
        .bearer_auth(READ)
        .send()
        .await
        .expect("events");
    assert_eq!(events.status(), 200);
    let mut buf = String::new();
    let (name, snapshot) = next_event(&mut events, &mut buf).await.expect("snapshot");
    assert_eq!(name, "snapshot");
    (events, buf, snapshot)
}

fn env_of(task: &Value) -> &Value {
    &task["spec"]["config"]["env"]
}

#[tokio::test]
async fn a_read_token_sees_the_names_of_a_tasks_env_not_their_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    let mut tokens = ApiTokens::default();
    tokens.add(&Secret::new(ADMIN.as_bytes()).expect("t"), Scope::Admin);
    tokens.add(&Secret::new(READ.as_bytes()).expect("t"), Scope::Read);
    cfg.api_tokens = Some(tokens);
    let c = spawn_coordinator_with(cfg, None).await;
    let base = format!("http://{}", c.addr);
    let (admin, reader) = (
        Client::with_token(&base, ADMIN),
        Client::with_token(&base, READ),
    );
    let redacted = json!({"API_KEY": REDACTED, "MODE": REDACTED});
    let given = json!({"API_KEY": VALUE, "MODE": "fast"});

    // The event stream opened with a read token, before the task: its snapshot and the
    // changes that follow.
    let (mut events, mut buf, _) = read_events(&base).await;

    let w = spawn_worker(
        fast_worker_config(&c.ws_url(), "w-env"),
        Executors::builtin(),
    );
    w.wait_state(|s| s == ConnState::Connected).await;
    let id = admin.submit(&[keyed_task()]).await[0].clone();
    admin.wait_status(&id, "completed").await;

    // The worker ran it with the value given.
    let results = admin.results(&id).await;
    assert_eq!(
        results[0]["body"]["result"]["stdout_tail"],
        VALUE.len().to_string(),
        "{results:?}"
    );
    // The admin sees the values; a read token the names.
    let path = format!("/api/v1/tasks/{id}");
    let (s, task) = admin.get(&path).await;
    assert_eq!((s, env_of(&task)), (200, &given), "{task}");
    assert!(task.get("env_redacted").is_none(), "{task}");
    let (s, task) = reader.get(&path).await;
    assert_eq!((s, env_of(&task)), (200, &redacted), "{task}");
    assert_eq!(task["env_redacted"], true, "marked: {task}");
    assert_eq!(
        task["spec"]["config"]["shell"], "printf %s \"${#API_KEY}\"",
        "the rest of the config as given: {task}"
    );
    let (s, listed) = reader.get("/api/v1/tasks").await;
    assert_eq!(s, 200);
    assert_eq!(env_of(&listed[0]), &redacted, "{listed}");
    assert!(!listed.to_string().contains(VALUE), "{listed}");
    let (_, listed) = admin.get("/api/v1/tasks").await;
    assert_eq!(env_of(&listed[0]), &given, "{listed}");

    // Every change of the task the read token's stream carried, and a snapshot made now.
    let mut changes = 0;
    while let Some((name, data)) = next_event(&mut events, &mut buf).await {
        if name == "task" && data["task_id"] == id.as_str() {
            changes += 1;
            assert!(!data.to_string().contains(VALUE), "{data}");
            assert_eq!(env_of(&data), &redacted, "{data}");
            if data["status"] == "completed" {
                break;
            }
        }
    }
    assert!(changes >= 2, "queued, running, completed: {changes} seen");
    drop(events);
    let (events, _, snapshot) = read_events(&base).await;
    assert_eq!(env_of(&snapshot["tasks"][0]), &redacted, "{snapshot}");
    assert!(!snapshot.to_string().contains(VALUE));
    drop(events);
    w.stop().await.expect("clean stop");
    c.stop().await;
}

/// Without API tokens everyone may submit, and sees what was submitted.
#[tokio::test]
async fn without_tokens_a_tasks_env_is_shown() {
    let (_dir, c) = crate::support::coordinator_with(|_| {}).await;
    let client = c.client();
    let id = client.submit(&[keyed_task()]).await[0].clone();
    let (s, task) = client.get(&format!("/api/v1/tasks/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(env_of(&task)["API_KEY"], VALUE, "{task}");
    c.stop().await;
}
