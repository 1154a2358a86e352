//! SIGHUP, the conventional "reload": a `tether coordinator` process reads its API token file
//! again (a token added works, one removed is refused, a bad file keeps the tokens in use),
//! and a `tether worker` process running a task goes on with it instead of dying, reading its
//! secret file again for its next registration.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tether_testkit::*;

/// Generous: the processes run on a small, busy machine.
const LONG: Duration = Duration::from_secs(60);

const FIRST: &str = "first-admin-token-of-the-reload-test";
const SECOND: &str = "second-admin-token-of-the-reload-test";

/// A child process, killed and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.0.id() as i32), signal).expect("signal");
    }

    /// Whether the process still runs (not exited, not killed by a signal).
    fn runs(&mut self) -> bool {
        self.0.try_wait().expect("try_wait").is_none()
    }
}

fn tether(log: &Path) -> Command {
    let log = std::fs::File::create(log).expect("log file");
    let mut c = Command::new(env!("CARGO_BIN_EXE_tether"));
    c.env_remove("TETHER_TOKEN")
        .env_remove("TETHER_SECRET")
        .env_remove("TETHER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    c
}

/// Waits until the log at `path` holds `what` `n` times, and returns it.
async fn logged(path: &Path, what: &str, n: usize) -> String {
    wait_for(&format!("{what:?} in {}", path.display()), LONG, || async {
        let text = std::fs::read_to_string(path).ok()?;
        (text.matches(what).count() >= n).then_some(text)
    })
    .await
}

fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

async fn status_with(base: &str, token: &str) -> u16 {
    Client::with_token(base, token).get("/api/v1/tasks").await.0
}

#[path = "support/cli_proc.rs"]
mod cli_proc;
use cli_proc::write_private;

#[tokio::test]
async fn a_sighup_to_the_coordinator_takes_a_token_added_to_its_file_and_drops_one_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("admin.token");
    write_private(&tokens, &format!("{FIRST}\n"));
    let log = dir.path().join("coordinator.log");
    let addr = free_addr();
    let mut coordinator = Proc(
        tether(&log)
            .args(["--log", "info", "coordinator", "--listen"])
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--admin-token-file")
            .arg(&tokens)
            .spawn()
            .expect("start tether coordinator"),
    );
    let base = format!("http://{addr}");
    let http = loopback_client(reqwest::Client::builder());
    wait_for("the coordinator to answer", LONG, || async {
        let r = http.get(format!("{base}/healthz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    assert_eq!(status_with(&base, FIRST).await, 200);
    assert_eq!(status_with(&base, SECOND).await, 401);

    // The second token added and the first removed, then SIGHUP: the line says so.
    write_private(&tokens, &format!("# rotated\n{SECOND}\n"));
    coordinator.signal(Signal::SIGHUP);
    let text = logged(&log, "SIGHUP: files read again", 1).await;
    assert!(
        text.contains("API tokens: 1 admin, 0 read, 0 metrics"),
        "{text}"
    );
    assert!(coordinator.runs(), "SIGHUP ended the coordinator:\n{text}");
    assert_eq!(status_with(&base, SECOND).await, 200, "the added token");
    assert_eq!(status_with(&base, FIRST).await, 401, "the removed token");

    // A bad file (a line too short to be a token): refused loudly, the tokens in use kept.
    write_private(&tokens, &format!("{SECOND}\nshort\n"));
    coordinator.signal(Signal::SIGHUP);
    let text = logged(&log, "a file read again cannot serve", 1).await;
    assert!(text.contains("the token on line 2 is not usable"), "{text}");
    assert!(text.contains("every API token in use is kept"), "{text}");
    assert!(
        !text.contains(SECOND) && !text.contains(FIRST),
        "a token in the log: {text}"
    );
    assert!(coordinator.runs(), "SIGHUP ended the coordinator:\n{text}");
    assert_eq!(status_with(&base, SECOND).await, 200, "the token in use");

    // The refusals of the removed token are in the log with the peer's address.
    assert!(
        text.contains("API request refused: unknown token"),
        "{text}"
    );
    assert!(text.contains("peer=Some(127.0.0.1:"), "{text}");

    coordinator.signal(Signal::SIGTERM);
    let ended = wait_for("the coordinator to stop on SIGTERM", LONG, || {
        let ended = coordinator.0.try_wait().expect("try_wait");
        async move { ended }
    })
    .await;
    assert!(ended.success(), "{ended:?}");
}

#[tokio::test]
async fn a_sighup_to_a_worker_running_a_task_leaves_it_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator_with(fast_coordinator_config(dir.path().join("data")), None).await;
    let log = dir.path().join("worker.log");
    let mut worker = Proc(
        tether(&log)
            .args(["--log", "info", "worker", "--coordinator"])
            .arg(c.ws_url())
            .args(["--id", "hup-w"])
            .args(["--heartbeat-interval", "200ms", "--heartbeat-timeout", "2s"])
            .spawn()
            .expect("start tether worker"),
    );
    let client = c.client();
    let id = client.submit(&[sleep_task(600_000, 1, 0)]).await.remove(0);
    client.wait_status(&id, "running").await;

    worker.signal(Signal::SIGHUP);
    let text = logged(&log, "SIGHUP: nothing to reload", 1).await;
    assert!(worker.runs(), "SIGHUP ended the worker:\n{text}");
    // Still its task, in the same attempt, the worker connected: nothing was handed back.
    let task = client.task(&id).await;
    assert_eq!(task["status"], "running", "{task}");
    assert_eq!(task["attempt"], 1, "{task}");
    let ws: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
    let w = ws.iter().find(|w| w["worker_id"] == "hup-w").cloned();
    let w = w.unwrap_or_default();
    assert_eq!(
        (&w["state"], &w["sessions"]),
        (&serde_json::json!("connected"), &serde_json::json!(1)),
        "{w}"
    );
    // A second one too (the handler stays).
    worker.signal(Signal::SIGHUP);
    logged(&log, "SIGHUP: nothing to reload", 2).await;
    assert!(worker.runs(), "a second SIGHUP ended the worker");
    assert_eq!(client.status(&id).await, "running");
}

/// A worker reads its secret file again on SIGHUP and signs its next registration with it,
/// its session and task going on meanwhile: a fleet secret rotates with no worker restarted.
/// A file that cannot serve keeps the secret in use. The coordinator, restarted on the new
/// secret alone, takes the worker back into the same attempt of its task; with the old
/// secret the worker would be refused there.
#[tokio::test]
async fn a_sighup_to_a_worker_reads_its_secret_file_again_for_its_next_registration() {
    const OLD: &str = "the old fleet secret of the worker reload test";
    const NEW: &str = "the new fleet secret of the worker reload test";
    let dir = tempfile::tempdir().expect("tempdir");
    let on = |secret: &str| {
        let mut cfg = fast_coordinator_config(dir.path().join("data"));
        // Time for the worker to come back on a busy machine, its task still its own.
        cfg.lost_after = Duration::from_secs(30);
        cfg.auth = Some(tether_coordinator::auth::WorkerAuth::fleet(
            tether_proto::auth::Secret::new(secret.as_bytes()).expect("secret"),
        ));
        cfg
    };
    let c = spawn_coordinator_with(on(OLD), None).await;
    let secret = dir.path().join("worker.secret");
    write_private(&secret, OLD);
    let log = dir.path().join("worker.log");
    let mut worker = Proc(
        tether(&log)
            .args(["--log", "info", "worker", "--coordinator"])
            .arg(c.ws_url())
            .args(["--id", "rotate-w", "--secret-file"])
            .arg(&secret)
            .args(["--heartbeat-interval", "200ms", "--heartbeat-timeout", "2s"])
            .spawn()
            .expect("start tether worker"),
    );
    let id = c
        .client()
        .submit(&[sleep_task(600_000, 1, 0)])
        .await
        .remove(0);
    c.client().wait_status(&id, "running").await;

    write_private(&secret, "short");
    worker.signal(Signal::SIGHUP);
    logged(
        &log,
        "SIGHUP: the worker secret file read again cannot serve",
        1,
    )
    .await;
    write_private(&secret, NEW);
    worker.signal(Signal::SIGHUP);
    let text = logged(&log, "SIGHUP: the worker secret read again", 1).await;
    assert!(worker.runs(), "SIGHUP ended the worker:\n{text}");
    let task = c.client().task(&id).await;
    assert_eq!(
        (&task["status"], &task["attempt"]),
        (&serde_json::json!("running"), &serde_json::json!(1)),
        "{task}"
    );

    let addr = c.addr;
    c.stop().await;
    let c = spawn_coordinator_with(on(NEW), Some(addr)).await;
    let client = c.client();
    wait_for("the worker back on the new secret", LONG, || async {
        let ws: Vec<serde_json::Value> = client.get_as("/api/v1/workers").await;
        ws.iter()
            .any(|w| w["worker_id"] == "rotate-w" && w["state"] == "connected")
            .then_some(())
    })
    .await;
    let task = client.task(&id).await;
    assert_eq!(
        (&task["status"], &task["attempt"]),
        (&serde_json::json!("running"), &serde_json::json!(1)),
        "the same attempt, its worker back: {task}"
    );
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("registering with the secret given since the last connection")
            && !text.contains("signature does not match"),
        "{text}"
    );
}
