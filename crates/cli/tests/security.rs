//! The `tether` binary with secrets and tokens: a worker process with the fleet secret in a
//! file registers, one with a wrong secret stops with a clear error, and client commands send
//! their token.

use std::process::Stdio;
use std::time::Duration;

use tether_coordinator::auth::{ApiTokens, Scope, WorkerAuth};
use tether_proto::auth::Secret;
use tether_testkit::*;
use tokio::process::Command;

const LONG: Duration = Duration::from_secs(60);

fn tether() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tether"));
    c.env_remove("TETHER_TOKEN")
        .env_remove("TETHER_SECRET")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

#[tokio::test]
async fn worker_secrets_and_api_tokens_are_read_from_files_by_the_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tempfile::tempdir().expect("files");
    let secret = files.path().join("fleet.secret");
    let wrong = files.path().join("wrong.secret");
    let token = files.path().join("admin.token");
    std::fs::write(&secret, "the fleet secret of this test\n").expect("write");
    std::fs::write(&wrong, "not the fleet secret of this test\n").expect("write");
    std::fs::write(&token, "admin-token-of-the-cli-test\n").expect("write");
    // Whatever the umask: the wrong secret is open to others, and the process says so.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    let mut auth = WorkerAuth::fleet(Secret::from_file(&secret).expect("secret"));
    auth.message_mac = true;
    cfg.auth = Some(auth);
    let mut tokens = ApiTokens::default();
    tokens.add_file(&token, Scope::Admin).expect("token");
    cfg.api_tokens = Some(tokens);
    let c = spawn_coordinator_with(cfg, None).await;
    let url = format!("ws://{}", c.addr);

    // A wrong secret: the process exits on its own with a clear error.
    let out = tokio::time::timeout(
        LONG,
        tether()
            .args(["worker", "--coordinator", &url, "--id", "cli-w"])
            .args(["--initial-reconnect-delay", "50ms"])
            .arg("--secret-file")
            .arg(&wrong)
            .output(),
    )
    .await
    .expect("the refused worker exits")
    .expect("run tether worker");
    let err = failed_saying(&out, "authentication failed");
    assert!(
        !err.contains("not the fleet secret"),
        "the secret leaked: {err}"
    );
    assert!(err.contains("readable by other users"), "{err}");

    // The right secret: it registers and runs work submitted through the CLI with a token,
    // every frame tagged (and it would refuse a coordinator that did not ask for tags).
    let mut worker = tether()
        .args([
            "worker",
            "--coordinator",
            &url,
            "--id",
            "cli-w",
            "--message-mac",
        ])
        .args(["--heartbeat-interval", "200ms", "--heartbeat-timeout", "2s"])
        .env("TETHER_SECRET_FILE", &secret)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tether worker");
    let http = format!("http://{}", c.addr);
    let denied = tether()
        .args(["tasks", "--coordinator", &http])
        .output()
        .await
        .expect("run tether tasks");
    assert!(!denied.status.success());
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains("bearer token") && err.contains("401"), "{err}");
    let submitted = tether()
        .args(["submit", "--coordinator", &http, "--token-file"])
        .arg(&token)
        .args(["--", "true"])
        .output()
        .await
        .expect("run tether submit");
    let said = String::from_utf8_lossy(&submitted.stderr);
    assert!(submitted.status.success(), "{said}");
    assert!(!said.contains("readable by other users"), "{said}");
    // The same token in a file open to others: it still works, and the client says so.
    let open = files.path().join("open.token");
    std::fs::copy(&token, &open).expect("copy");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let listed = tether()
        .args(["tasks", "--coordinator", &http, "--token-file"])
        .arg(&open)
        .output()
        .await
        .expect("run tether tasks");
    let said = String::from_utf8_lossy(&listed.stderr);
    assert!(listed.status.success(), "{said}");
    assert!(said.contains("readable by other users"), "{said}");
    let admin = Client::with_token(&http, "admin-token-of-the-cli-test");
    wait_for("the submitted task to complete", LONG, || async {
        let (_, v) = admin.get("/api/v1/tasks").await;
        let done = v
            .as_array()
            .is_some_and(|ts| ts.len() == 1 && ts[0]["status"] == "completed");
        done.then_some(())
    })
    .await;
    let listed = tether()
        .args(["tasks", "--coordinator", &http, "--json"])
        .env("TETHER_TOKEN", "admin-token-of-the-cli-test")
        .output()
        .await
        .expect("run tether tasks");
    assert!(listed.status.success());
    let (_, o) = admin.get("/api/v1/overview").await;
    assert_eq!(o["counters"]["mac_sessions"], 1, "{o}");
    assert_eq!(o["counters"]["mac_failures"], 0, "{o}");
    let _ = worker.kill().await;
    c.stop().await;
}

#[tokio::test]
async fn message_mac_without_a_secret_is_a_clear_error_on_both_sides() {
    let out = tether()
        .args(["coordinator", "--listen", "127.0.0.1:0", "--message-mac"])
        .env_remove("TETHER_SECRET_FILE")
        .env_remove("TETHER_SECRETS_DIR")
        .output()
        .await
        .expect("run tether coordinator");
    failed_saying(&out, "--message-mac needs worker authentication");
    let out = tether()
        .args(["worker", "--coordinator", "ws://127.0.0.1:9", "--id", "w"])
        .arg("--message-mac")
        .env_remove("TETHER_SECRET_FILE")
        .output()
        .await
        .expect("run tether worker");
    failed_saying(&out, "--message-mac needs this worker's secret");
}

/// Asserts that the process failed and its stderr says `says`; returns the stderr.
fn failed_saying(out: &std::process::Output, says: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "succeeded: {err}");
    assert!(err.contains(says), "{err}");
    err
}
