//! `tether checkpoint` against a real coordinator and worker in this process: what it says it
//! asked, what `--wait` reports, and a task that is not running.

use std::time::Duration;

use tether_proto::TaskSpec;
use tether_testkit::*;
use tether_worker::{ConnState, Executors};

/// The longest one `tether` run may take here.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// Runs `tether checkpoint` with `args` against `base`; its exit code, stdout and stderr.
async fn checkpoint(base: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["checkpoint"];
    all.extend_from_slice(args);
    tether(base, &all).await
}

/// Runs `tether` with `args` against `base`; its exit code, stdout and stderr.
async fn tether(base: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.args(args)
        .args(["--coordinator", base])
        .env_remove("TETHER_LOG")
        .env_remove("TETHER_TOKEN")
        .env_remove("TETHER_TOKEN_FILE")
        .kill_on_drop(true);
    let out = tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .expect("tether checkpoint ended in time")
        .expect("run tether checkpoint");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A coordinator (its data under `dir/c`) and a worker `w1` of the built-in executors (its
/// state directory `dir/w`), connected to it.
async fn coordinator_and_worker(dir: &std::path::Path) -> (TestCoordinator, TestWorker) {
    let c = spawn_coordinator(dir.join("c")).await;
    let mut cfg = fast_worker_config(&c.ws_url(), "w1");
    cfg.state_dir = Some(dir.join("w"));
    let w = spawn_worker(cfg, Executors::builtin());
    w.wait_state(|s| s == ConnState::Connected).await;
    (c, w)
}

/// A `--shell` task that wrote its checkpoint directory, polled only every minute: `tether
/// checkpoint --wait` says whom it asked, and the checkpoint the request made (exit 0), well
/// before the poll would have. Before, the `command` executor ignored the request: the command
/// printed the task's status and exited 0 with no checkpoint made. Asked again with the
/// directory unchanged, the worker says so at once, naming that checkpoint, and `--wait`
/// (30 s) exits 1 with its reason; before, it waited its 30 s out and said only that nothing
/// came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_wait_reports_the_checkpoint_a_shell_task_made_at_the_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, w) = coordinator_and_worker(dir.path()).await;
    let client = c.client();
    let ready = dir.path().join("ready");
    let script = r#"echo 41 > "$TETHER_CHECKPOINT_DIR/state"; touch "$READY"
        i=0; while [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done"#;
    let spec = TaskSpec::new(
        "command",
        serde_json::json!({
            "shell": script,
            "env": {"READY": ready},
            "checkpoint_poll_ms": 60_000,
        }),
    );
    let id = client.submit(&[spec]).await.remove(0);
    client.wait_status(&id, "running").await;
    wait_for("the task's state written", DEADLINE, || async {
        ready.exists().then_some(())
    })
    .await;
    assert!(client.task(&id).await["latest_checkpoint"].is_null());

    let base = format!("http://{}", c.addr);
    let (code, out, err) = checkpoint(&base, &["--wait=20s", id.as_str()]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains(&format!(
            "checkpoint asked of worker w1 for {id} (attempt 1)"
        )),
        "{out}"
    );
    let t = client.task(&id).await;
    let cp = &t["latest_checkpoint"];
    let said = format!(
        "checkpoint {} of {id} (attempt 1): {} bytes",
        cp["checkpoint_id"].as_str().expect("a checkpoint"),
        cp["size"]
    );
    assert!(out.contains(&said), "{out}\n{t}");

    // Asked again with the directory as shipped: the worker's look finds nothing new and says
    // so at once, naming the latest (which holds the task's state), well within the wait.
    let (code, out, err) = checkpoint(&base, &["--wait", id.as_str()]).await;
    assert_eq!(code, Some(1), "stdout: {out}\nstderr: {err}");
    let latest = cp["checkpoint_id"].as_str().expect("a checkpoint");
    assert!(
        err.contains(&format!(
            "worker w1 made no checkpoint of {id}: the checkpoint dir is unchanged since \
             checkpoint {latest}: nothing new to ship"
        )),
        "{err}"
    );
    assert!(!err.contains("within 30s"), "{err}");
    // The worker's answer is on the attempt, and `tether task` shows it.
    let (code, shown, err) = tether(&base, &["task", id.as_str()]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        shown.contains("attempt 1: no checkpoint at ")
            && shown.contains(&format!("unchanged since checkpoint {latest}")),
        "{shown}"
    );
    assert_eq!(
        client.task(&id).await["latest_checkpoint"]["checkpoint_id"].as_str(),
        Some(latest),
        "no newer checkpoint"
    );

    client.control(&id, "cancel").await;
    client.wait_status(&id, "cancelled").await;
    w.stop().await.expect("clean stop");
    c.stop().await;
}

/// The state of process `pid` (`R`, `S`, `T` for stopped, ...), if it is there.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// `tether checkpoint --wait` on a paused `command` task (its processes stopped) exits 1 at
/// once with the worker's answer that the task is paused, naming its latest checkpoint; once
/// resumed, what its directory holds is shipped without another request (its poll is a
/// minute away). Before, the request went unanswered (the worker re-sent the checkpoint the
/// coordinator held): `--wait` waited out its time and said only that nothing came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_wait_on_a_paused_task_says_it_is_paused_and_the_resume_ships_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, w) = coordinator_and_worker(dir.path()).await;
    let client = c.client();
    let d = dir.path().join("d");
    std::fs::create_dir(&d).expect("mkdir");
    let script = r#"echo 1 > "$TETHER_CHECKPOINT_DIR/n"; echo "$TETHER_CHECKPOINT_DIR" > "$D/cp"
        echo $$ > "$D/pid.tmp"; mv "$D/pid.tmp" "$D/pid"
        i=0; while [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done"#;
    let spec = TaskSpec::new(
        "command",
        serde_json::json!({"shell": script, "env": {"D": d}, "checkpoint_poll_ms": 60_000}),
    );
    let id = client.submit(&[spec]).await.remove(0);
    client.wait_status(&id, "running").await;
    let pid: u32 = wait_for("the task started", DEADLINE, || async {
        std::fs::read_to_string(d.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
    .await;
    let cp_dir = std::fs::read_to_string(d.join("cp")).expect("cp");
    let cp_dir = std::path::PathBuf::from(cp_dir.trim_end());
    let base = format!("http://{}", c.addr);
    let (code, out, err) = checkpoint(&base, &["--wait=20s", id.as_str()]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let t = client.task(&id).await;
    let latest = t["latest_checkpoint"]["checkpoint_id"]
        .as_str()
        .expect("a checkpoint")
        .to_owned();

    let (status, v) = client.control(&id, "pause").await;
    assert_eq!(status, 200, "{v}");
    wait_for("the task's processes stopped", DEADLINE, || async {
        (proc_state(pid) == Some('T')).then_some(())
    })
    .await;
    let (code, out, err) = checkpoint(&base, &["--wait=20s", id.as_str()]).await;
    assert_eq!(code, Some(1), "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains(&format!(
            "worker w1 made no checkpoint of {id}: the task is paused: no checkpoint is made \
             while it is; its checkpoint dir is looked at once it is resumed (its latest \
             checkpoint is {latest})"
        )),
        "{err}"
    );
    assert!(!err.contains("within 20s"), "{err}");

    // Written while paused (by the test: the task's processes are stopped), shipped once
    // resumed.
    std::fs::write(cp_dir.join("n"), "2\n").expect("write");
    let (status, v) = client.control(&id, "resume").await;
    assert_eq!(status, 200, "{v}");
    let newer = wait_for("a checkpoint shipped once resumed", DEADLINE, || async {
        let t = client.task(&id).await;
        let now = t["latest_checkpoint"]["checkpoint_id"].as_str()?.to_owned();
        (now != latest).then_some(now)
    })
    .await;
    assert_ne!(newer, latest);

    client.control(&id, "cancel").await;
    client.wait_status(&id, "cancelled").await;
    w.stop().await.expect("clean stop");
    c.stop().await;
}

/// A task that is not running has no worker to ask: `tether checkpoint` exits 1 with the
/// coordinator's reason, with or without `--wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_of_a_task_not_running_exits_1_saying_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().join("c")).await;
    let client = c.client();
    // No worker: the task stays queued.
    let id = client
        .submit(&[TaskSpec::new(
            "command",
            serde_json::json!({"shell": "true"}),
        )])
        .await
        .remove(0);
    let base = format!("http://{}", c.addr);
    for args in [vec![id.as_str()], vec!["--wait", id.as_str()]] {
        let (code, out, err) = checkpoint(&base, &args).await;
        assert_eq!(code, Some(1), "stdout: {out}\nstderr: {err}");
        assert!(
            err.contains(&format!("task {id} is not running on a connected worker")),
            "{err}"
        );
        assert!(!out.contains("checkpoint asked"), "{out}");
    }
    client.control(&id, "cancel").await;
    let (code, _, err) = checkpoint(&base, &[id.as_str()]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("task {id} is already cancelled")),
        "{err}"
    );
    c.stop().await;
}
