//! The audit trail: API requests refused are logged with the peer's address (at WARN once an
//! address a minute, the repeats at debug) and the label of the token when it is a known one,
//! never a token; commands are logged at INFO with their token's label; a metrics token reads
//! `/metrics` and nothing else; worker authentication failures and registrations name the
//! peer.
//!
//! The log is read from a subscriber set for this test's thread only (the test's runtime,
//! current-thread, runs the coordinator's tasks it spawns), as in `refusal_storm`.

use serde_json::json;
use tether_coordinator::auth::{ApiTokens, Scope, WorkerAuth};
use tether_proto::auth::Secret;
use tether_testkit::*;

use crate::support::{CapturedLog, coordinator_with};

const ADMIN: &str = "admin-token-of-the-audit-test";
const READ: &str = "read-token-of-the-audit-test";
const METRICS: &str = "metrics-token-of-the-audit-test";
const UNKNOWN: &str = "unknown-token-of-the-audit-test";

/// The coordinator's log, debug and up, captured on this thread until the guard is dropped.
fn capture() -> (CapturedLog, tracing::subscriber::DefaultGuard) {
    CapturedLog::capture("tether_coordinator=debug")
}

fn token_file(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

#[tokio::test]
async fn refused_requests_and_commands_are_logged_with_their_peer_and_token_label() {
    let (log, _guard) = capture();
    let files = tempfile::tempdir().expect("files");
    let mut tokens = ApiTokens::default();
    let admin = token_file(files.path(), "admin.token", &format!("# ops\n{ADMIN}\n"));
    let read = token_file(files.path(), "read.token", &format!("{READ}\n"));
    let metrics = token_file(files.path(), "metrics.token", &format!("{METRICS}\n"));
    tokens.add_file(&admin, Scope::Admin).expect("admin");
    tokens.add_file(&read, Scope::Read).expect("read");
    tokens.add_file(&metrics, Scope::Metrics).expect("metrics");
    let (_dir, c) = coordinator_with(|cfg| cfg.api_tokens = Some(tokens)).await;
    let base = format!("http://{}", c.addr);

    // Two refusals from one address: one WARN line, then one at debug.
    for _ in 0..2 {
        let (status, _) = Client::with_token(&base, UNKNOWN)
            .get("/api/v1/tasks")
            .await;
        assert_eq!(status, 401);
    }
    let warned = log.lines("API request refused: unknown token");
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(warned[0].contains(" WARN "), "{}", warned[0]);
    assert!(warned[0].contains("peer=Some(127.0.0.1:"), "{}", warned[0]);
    assert!(
        warned[0].contains("path=\"/api/v1/tasks\""),
        "{}",
        warned[0]
    );
    let again = log.lines("API request refused again: unknown token");
    assert_eq!(again.len(), 1, "{again:#?}");
    assert!(
        again[0].contains(" DEBUG ") && again[0].contains("repeat=1"),
        "{}",
        again[0]
    );

    // A token of a narrower scope: refused, and named by its file and line.
    let admin_client = Client::with_token(&base, ADMIN);
    let id = admin_client
        .submit(&[sleep_task(60_000, 1, 0)])
        .await
        .remove(0);
    let (status, _) = Client::with_token(&base, READ)
        .post(&format!("/api/v1/tasks/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 403);
    let narrow = log.lines("the token given has the read scope");
    assert_eq!(narrow.len(), 1, "{narrow:#?}");
    assert!(
        narrow[0].contains("token=\"read.token:1\""),
        "{}",
        narrow[0]
    );

    // Commands: who (the token's label, the peer), what, and the answer.
    let (status, _) = admin_client.control(&id, "cancel").await;
    assert_eq!(status, 200);
    let commands = log.lines("API command");
    assert_eq!(commands.len(), 2, "{commands:#?}");
    for (line, path, status) in [
        (&commands[0], "/api/v1/tasks\"".to_owned(), "status=201"),
        (
            &commands[1],
            format!("/api/v1/tasks/{id}/cancel\""),
            "status=200",
        ),
    ] {
        assert!(line.contains(" INFO "), "{line}");
        assert!(line.contains("token=\"admin.token:2\""), "{line}");
        assert!(line.contains("peer=Some(127.0.0.1:"), "{line}");
        assert!(line.contains(&path) && line.contains(status), "{line}");
    }
    // A submission's line names the tasks it made.
    assert!(
        commands[0].contains(&format!("tasks={id}")),
        "{}",
        commands[0]
    );
    // Reads are not commands.
    let (status, _) = admin_client.get("/api/v1/tasks").await;
    assert_eq!(status, 200);
    assert_eq!(log.lines("API command").len(), 2);

    // The metrics token scrapes, and reads no task.
    let scraper = Client::with_token(&base, METRICS);
    let r = loopback_client(reqwest::Client::builder())
        .get(format!("{base}/metrics"))
        .bearer_auth(METRICS)
        .send()
        .await
        .expect("scrape");
    assert_eq!(r.status().as_u16(), 200);
    for path in [
        "/api/v1/tasks".to_owned(),
        format!("/api/v1/tasks/{id}"),
        "/api/v1/workers".to_owned(),
    ] {
        let (status, body) = scraper.get(&path).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(
            body.to_string().contains("needs the read scope"),
            "{path}: {body}"
        );
    }

    let text = log.text();
    for token in [ADMIN, READ, METRICS, UNKNOWN] {
        assert!(!text.contains(token), "a token in the log: {token}");
    }
    c.stop().await;
}

#[tokio::test]
async fn worker_authentication_failures_and_registrations_name_the_peer() {
    let (log, _guard) = capture();
    let secret = Secret::new(b"fleet secret of the audit test").expect("secret");
    let (_dir, c) =
        coordinator_with(|cfg| cfg.auth = Some(WorkerAuth::fleet(secret.clone()))).await;
    let mut wrong = fast_worker_config(&c.ws_url(), "audit-wrong");
    wrong.secret = Some(Secret::new(b"not the fleet secret of the audit test").expect("secret"));
    let refused = spawn_worker(wrong, tether_worker::Executors::builtin());
    let failed = wait_for(
        "the refusal in the log",
        std::time::Duration::from_secs(30),
        || {
            let lines = log.lines("worker authentication failed; closing with 4001");
            async move { lines.into_iter().next() }
        },
    )
    .await;
    assert!(failed.contains("worker=audit-wrong"), "{failed}");
    assert!(failed.contains("peer=127.0.0.1:"), "{failed}");
    let _ = refused.stop().await;

    let mut right = fast_worker_config(&c.ws_url(), "audit-right");
    right.secret = Some(secret);
    let w = crate::support::connected(right, tether_worker::Executors::builtin()).await;
    let registered = wait_for(
        "the registration in the log",
        std::time::Duration::from_secs(30),
        || {
            let lines = log.lines("worker registered");
            async move { lines.into_iter().find(|l| l.contains("worker=audit-right")) }
        },
    )
    .await;
    assert!(registered.contains("peer=Some(127.0.0.1:"), "{registered}");
    w.stop().await.expect("clean stop");
    c.stop().await;
}
