//! The client commands that follow and steer running tasks, as a user runs them: real `tether
//! coordinator`, `tether worker` and client processes. `tether watch` (and `submit --watch`)
//! reports each named task's changes, ends when they have all ended, exits 0 only if all
//! completed, and keeps following through a coordinator killed with SIGKILL and restarted on
//! its data directory; `tether checkpoint` gets a running task checkpointed now, and `tether
//! task` shows its live state and checkpoints; `tether tasks --all` reads every task page by page.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

mod support;
use support::Watcher;

const LONG: Duration = Duration::from_secs(90);

/// A child process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tether() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tether"))
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Starts `cmd` with no standard streams.
fn quiet(cmd: &mut Command, what: &str) -> Proc {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    Proc(child)
}

fn coordinator(addr: SocketAddr, dir: &Path) -> Proc {
    let mut cmd = tether();
    cmd.args(["--log", "warn", "coordinator", "--listen"])
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(dir)
        .args(["--heartbeat-interval", "200ms", "--heartbeat-timeout", "2s"]);
    quiet(&mut cmd, "coordinator")
}

fn worker(addr: SocketAddr, id: &str) -> Proc {
    let mut cmd = tether();
    cmd.args(["--log", "warn", "worker", "--coordinator"])
        .arg(format!("http://{addr}"))
        .args(["--id", id, "--slots", "2"])
        .args(["--initial-reconnect-delay", "100ms"]);
    quiet(&mut cmd, "worker")
}

impl Watcher {
    /// Waits for the exit; its code, and every stdout line.
    fn wait_exit(&mut self) -> (Option<i32>, Vec<String>) {
        let deadline = Instant::now() + LONG;
        loop {
            if let Some(status) = self.try_wait() {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(l);
                }
                return (status.code(), self.seen.clone());
            }
            assert!(
                Instant::now() < deadline,
                "still running; got {:?}; stderr: {}",
                self.seen,
                self.stderr_text()
            );
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the watch says it lost its stream and will open it again.
    async fn wait_reopening(&self) {
        self.wait_stderr("opening the event stream again", LONG)
            .await;
    }
}

/// Runs a client command against the coordinator at `base`: success, stdout, stderr.
fn client(base: &str, args: &[&str]) -> (bool, String, String) {
    let out = tether()
        .args(args)
        .args(["--coordinator", base])
        .output()
        .expect("run tether");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
/// A fault proxy in front of the site's coordinator, and the URL through it.
async fn proxy_in_front(site: &Site) -> (tether_faultproxy::Proxy, String) {
    let proxy = tether_faultproxy::Proxy::start(tether_faultproxy::ProxyConfig {
        name: "watch".into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        upstream: site.addr,
        seed: 1,
    })
    .await
    .expect("proxy");
    let through = format!("http://{}", proxy.listen_addr());
    (proxy, through)
}

async fn wait_ready(http: &reqwest::Client, base: &str) {
    tether_testkit::wait_for("the coordinator to answer", LONG, || async {
        let r = http.get(format!("{base}/healthz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .expect("http client")
}

async fn submit(http: &reqwest::Client, base: &str, id: &str, config: serde_json::Value) {
    let spec = json!({ "task_id": id, "kind": "sleep", "config": config });
    submit_spec(http, base, spec).await;
}

/// Submits one task `spec` (JSON), which must be taken.
async fn submit_spec(http: &reqwest::Client, base: &str, spec: serde_json::Value) {
    let r = http
        .post(format!("{base}/api/v1/tasks"))
        .json(&json!({ "tasks": [&spec] }))
        .send()
        .await
        .expect("submit");
    assert!(r.status().is_success(), "submit {spec}: {}", r.status());
}

/// One coordinator's place: its data directory, address, API base URL and an HTTP client.
struct Site {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    base: String,
    http: reqwest::Client,
}

impl Site {
    fn new() -> Self {
        let addr = free_addr();
        Site {
            dir: tempfile::tempdir().expect("tempdir"),
            addr,
            base: format!("http://{addr}"),
            http: http(),
        }
    }

    /// Starts a coordinator on the site's address and data directory, and waits until it answers.
    async fn coordinator(&self) -> Proc {
        let p = coordinator(self.addr, self.dir.path());
        wait_ready(&self.http, &self.base).await;
        p
    }

    async fn submit(&self, id: &str, config: serde_json::Value) {
        submit(&self.http, &self.base, id, config).await;
    }

    /// Waits until `tether task id` says the task runs.
    async fn wait_running(&self, id: &str) {
        tether_testkit::wait_for("the task to run", LONG, || async {
            let (_, out, _) = client(&self.base, &["task", id, "--json"]);
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            (v["task"]["status"] == "running").then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_each_change_and_exits_non_zero_when_a_named_task_failed() {
    let site = Site::new();
    let _coord = site.coordinator().await;
    site.submit("good", json!({"ms": 300, "steps": 3})).await;
    site.submit("bad", json!({"ms": 300, "steps": 3, "fail": true}))
        .await;
    let mut watch = Watcher::start(&["watch", "--coordinator", &site.base, "good", "bad"]);
    // No worker yet: both are reported queued, then run once one comes.
    watch.wait_line(&["good", "queued"]);
    watch.wait_line(&["bad", "queued"]);
    let _w = worker(site.addr, "w1");
    let (code, lines) = watch.wait_exit();
    assert_eq!(
        code,
        Some(1),
        "a failed task makes the watch fail: {lines:?}"
    );
    let has = |parts: &[&str]| lines.iter().any(|l| parts.iter().all(|p| l.contains(p)));
    assert!(has(&["good", "running", "on w1"]), "{lines:?}");
    assert!(has(&["good", "completed"]), "{lines:?}");
    assert!(has(&["bad", "failed"]), "{lines:?}");
    assert!(has(&["1 of 2 tasks completed"]), "{lines:?}");
    let repeats = lines
        .iter()
        .filter(|l| l.contains("good") && l.contains("completed"));
    assert_eq!(repeats.count(), 1, "each change once: {lines:?}");
    assert!(
        watch.stderr_text().contains("not completed: bad failed"),
        "{}",
        watch.stderr_text()
    );
    // The listing names the worker that ran an ended task (its lease is gone).
    let (ok, out, err) = client(&site.base, &["tasks"]);
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("good ") && l.contains("completed") && l.contains(" w1 ")),
        "{out}"
    );

    // `submit --watch` follows what it submitted and exits 0 when all completed; the script
    // succeeds only if the flags' environment and directory reached it.
    let mut submit = Watcher::start(&[
        "submit",
        "--coordinator",
        &site.base,
        "--watch",
        "--id",
        "envcheck",
        "--env",
        "CHECK=a=b",
        "--cwd",
        "/tmp",
        "--shell",
        r#"test "$CHECK" = a=b && test "$(pwd)" = /tmp"#,
    ]);
    let (code, lines) = submit.wait_exit();
    assert_eq!(code, Some(0), "{lines:?}; stderr: {}", submit.stderr_text());
    assert_eq!(lines.first().map(String::as_str), Some("envcheck"));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("envcheck") && l.contains("completed")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l == "1 of 1 tasks completed"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_keeps_following_through_a_coordinator_killed_and_restarted() {
    let site = Site::new();
    let coord = site.coordinator().await;
    site.submit("across", json!({"ms": 300, "steps": 3})).await;
    let mut watch = Watcher::start(&["watch", "--coordinator", &site.base, "across"]);
    watch.wait_line(&["across", "queued"]);
    drop(coord); // SIGKILL
    // The watch notices and keeps trying while the coordinator is down.
    watch.wait_reopening().await;
    let _coord = site.coordinator().await;
    let _w = worker(site.addr, "w1");
    let (code, lines) = watch.wait_exit();
    assert_eq!(code, Some(0), "{lines:?}; stderr: {}", watch.stderr_text());
    assert!(
        lines
            .iter()
            .any(|l| l.contains("across") && l.contains("completed")),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_a_named_task_reports_its_end_reached_while_its_stream_was_cut() {
    let site = Site::new();
    let _coord = site.coordinator().await;
    site.submit("in-gap", json!({"ms": 300, "steps": 3})).await;
    let (proxy, through) = proxy_in_front(&site).await;
    let mut watch = Watcher::start(&["watch", "--coordinator", &through, "in-gap"]);
    watch.wait_line(&["in-gap", "queued"]);
    proxy.down().await;
    watch.wait_reopening().await;
    // The task runs and ends while the watch sees nothing: no event of it will ever come.
    let _w = worker(site.addr, "w1");
    tether_testkit::wait_for("the task to complete", LONG, || async {
        let r = site
            .http
            .get(format!("{}/api/v1/tasks/in-gap", site.base))
            .send()
            .await
            .ok()?;
        let t: serde_json::Value = r.json().await.ok()?;
        (t["status"] == "completed").then_some(())
    })
    .await;
    proxy.up().await.expect("proxy up");
    let (code, lines) = watch.wait_exit();
    assert_eq!(code, Some(0), "{lines:?}; stderr: {}", watch.stderr_text());
    let ends = lines
        .iter()
        .filter(|l| l.contains("in-gap") && l.contains("completed"));
    assert_eq!(ends.count(), 1, "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_every_task_reports_a_change_made_while_its_stream_was_cut_to_any_task() {
    let site = Site::new();
    let _coord = site.coordinator().await;
    site.submit("old", json!({"ms": 60_000})).await;
    // More newer tasks than the stream's snapshot holds: "old" is not in it.
    let filler: Vec<_> = (0..520)
        .map(|i| json!({ "task_id": format!("filler-{i}"), "kind": "sleep", "config": {} }))
        .collect();
    let r = site
        .http
        .post(format!("{}/api/v1/tasks", site.base))
        .json(&json!({ "tasks": filler }))
        .send()
        .await
        .expect("submit");
    assert!(r.status().is_success(), "{}", r.status());
    let (proxy, through) = proxy_in_front(&site).await;
    // Pages of two: the catch-up after the gap must read page after page to see every change.
    let mut watch = Watcher::start(&["watch", "--coordinator", &through, "--page-size", "2"]);
    // The first snapshot is the baseline, reported as nothing; a task submitted after it shows
    // the stream is live.
    let mut live = None;
    for i in 0..200 {
        site.submit(&format!("live-{i}"), json!({})).await;
        if let Ok(l) = watch.lines.recv_timeout(Duration::from_millis(300)) {
            watch.seen.push(l);
            live = Some(format!("live-{i} "));
            break;
        }
    }
    let live = live.expect("the watch reports a task submitted after its start");
    watch.wait_line(&[&live, "queued"]);
    proxy.down().await;
    watch.wait_reopening().await;
    let r = site
        .http
        .post(format!("{}/api/v1/tasks/old/cancel", site.base))
        .send()
        .await
        .expect("cancel");
    assert!(r.status().is_success(), "{}", r.status());
    let cut: Vec<String> = (0..5).map(|i| format!("filler-{}", 100 * i + 7)).collect();
    for id in &cut {
        let r = site
            .http
            .post(format!("{}/api/v1/tasks/{id}/cancel", site.base))
            .send()
            .await
            .expect("cancel");
        assert!(r.status().is_success(), "{}", r.status());
    }
    proxy.up().await.expect("proxy up");
    watch.wait_line(&["old", "cancelled"]);
    for id in &cut {
        watch.wait_line(&[&format!("{id} "), "cancelled"]);
    }
    // And nothing already reported is reported again.
    site.submit("after", json!({})).await;
    watch.wait_line(&["after", "queued"]);
    let repeats = watch.seen.iter().filter(|l| l.contains(&live)).count();
    assert_eq!(repeats, 1, "{:?}", watch.seen);
    // Of the fillers, only those changed in the gap, once each.
    let fillers: Vec<&String> = watch.seen.iter().filter(|l| l.contains("filler")).collect();
    assert_eq!(fillers.len(), cut.len(), "{fillers:?}");
    assert!(
        cut.iter()
            .all(|id| fillers.iter().any(|l| l.contains(&format!("{id} ")))),
        "{fillers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_refuses_an_unknown_task_and_an_unreachable_coordinator_at_once() {
    let site = Site::new();
    let mut unreachable = Watcher::start(&["watch", "--coordinator", &site.base, "x"]);
    let (code, _) = unreachable.wait_exit();
    assert_eq!(code, Some(2), "could not follow: not a task's failure");
    assert!(
        unreachable
            .stderr_text()
            .contains("cannot reach the coordinator"),
        "{}",
        unreachable.stderr_text()
    );
    let _coord = site.coordinator().await;
    let mut unknown = Watcher::start(&["watch", "--coordinator", &site.base, "nope"]);
    let (code, _) = unknown.wait_exit();
    assert_eq!(code, Some(2), "could not follow: not a task's failure");
    assert!(
        unknown.stderr_text().contains("no task nope"),
        "{}",
        unknown.stderr_text()
    );
    // An id no task can have: refused before asking, and as a watch that could not follow.
    let mut invalid = Watcher::start(&["watch", "--coordinator", &site.base, "bad id!"]);
    let (code, _) = invalid.wait_exit();
    assert_eq!(code, Some(2), "{}", invalid.stderr_text());
    assert!(
        invalid.stderr_text().contains("task id \"bad id!\""),
        "{}",
        invalid.stderr_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_asks_a_running_task_for_one_and_task_shows_its_state_and_checkpoints() {
    let site = Site::new();
    let _coord = site.coordinator().await;
    // No checkpoints of its own (`checkpoint_every` 0): any it has was asked for.
    site.submit(
        "long",
        json!({"ms": 6000, "steps": 30, "checkpoint_every": 0}),
    )
    .await;
    let _w = worker(site.addr, "w1");
    let run = |args: &[&str]| client(&site.base, args);
    tether_testkit::wait_for("the task to report progress", LONG, || async {
        let (_, out, _) = run(&["task", "long", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (v["task"]["status"] == "running" && !v["state"].is_null()).then_some(())
    })
    .await;
    let (_, out, _) = run(&["task", "long", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["checkpoints"], json!([]), "none before it is asked: {v}");
    let (ok, out, err) = run(&["checkpoint", "long"]);
    assert!(ok, "{out} {err}");
    // It says whom it asked (b633b7d; it printed the task's status, "long running").
    assert_eq!(
        out.trim(),
        "checkpoint asked of worker w1 for long (attempt 1)"
    );
    tether_testkit::wait_for("the checkpoint asked for", LONG, || async {
        let (_, out, _) = run(&["task", "long", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v["checkpoints"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
            .then_some(())
    })
    .await;
    let (ok, out, _) = run(&["task", "long"]);
    assert!(ok);
    assert!(
        out.contains("CHECKPOINT") && out.contains("state "),
        "{out}"
    );
    // What it runs, besides where it is.
    assert!(
        out.lines()
            .any(|l| l.starts_with("config ") && l.contains(r#""steps":30"#)),
        "{out}"
    );
    let (ok, _, err) = run(&["checkpoint", "nope"]);
    assert!(!ok);
    assert!(err.contains("HTTP 404"), "{err}");
    // An id the rules refuse is refused before any request: a URL would resolve `x/../long`
    // into `long` (and cut `long#x` at the `#`), acting on a task the user never named.
    for args in [
        ["cancel", "x/../long"],
        ["pause", "../tasks/long"],
        ["task", "long#x"],
        ["checkpoint", ".."],
    ] {
        let out = tether()
            .args(args)
            .args(["--coordinator", &site.base])
            .output()
            .expect("run tether");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("invalid value"), "{args:?}: {err}");
    }
    let (_, out, _) = run(&["task", "long", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["task"]["status"], "running", "untouched: {v}");
}

/// `tether cancel`, `pause` and `resume` take several ids: each acted on once, its answer
/// printed in the order given; one refused (unknown, already ended) is said on stderr, the
/// others are acted on all the same, and the command fails naming how many were refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_of_several_tasks_acts_on_each_in_order_and_says_each_refusal() {
    let site = Site::new();
    let _coord = site.coordinator().await;
    // No worker: every task stays queued.
    for id in ["a", "b", "c"] {
        site.submit(id, json!({"ms": 1000})).await;
    }
    let run = |args: &[&str]| client(&site.base, args);
    let (ok, out, err) = run(&["pause", "c", "a", "c"]);
    assert!(ok, "{out} {err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["c paused", "a paused"]);
    let (ok, out, err) = run(&["resume", "a", "c"]);
    assert!(ok, "{out} {err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["a queued", "c queued"]);
    let (ok, out, err) = run(&["cancel", "a", "nosuch", "b"]);
    assert!(!ok, "an unknown task fails the command: {out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["a cancelled", "b cancelled"]
    );
    assert!(err.contains("task nosuch:"), "{err}");
    assert!(
        err.contains("1 of 3 tasks refused the cancel (first nosuch"),
        "{err}"
    );
    // An ended task refuses a second cancel; the one still queued is cancelled.
    let (ok, out, err) = run(&["cancel", "b", "c", "--json"]);
    assert!(!ok, "{out}");
    let answers: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON document a line"))
        .collect();
    assert_eq!(answers.len(), 1, "{out}");
    assert_eq!(answers[0]["task_id"], "c");
    assert_eq!(answers[0]["status"], "cancelled");
    assert!(err.contains("task b:"), "{err}");
}

/// A run's tasks controlled by its name: each action takes those of the name it applies to
/// (pause the queued and running, resume the paused, cancel every one not ended), a task
/// already ended is left alone, a run with nothing left to act on says so and succeeds, and a
/// name no task has is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_of_a_run_by_its_name_takes_the_tasks_it_applies_to() {
    let site = Site::new();
    let _coord = site.coordinator().await;
    // No worker: every task stays queued.
    for id in ["r-1", "r-2", "r-3", "other"] {
        let name = if id == "other" { "run-9" } else { "run-7" };
        let spec = json!({"task_id": id, "kind": "sleep", "config": {"ms": 1000}, "name": name});
        submit_spec(&site.http, &site.base, spec).await;
    }
    let run = |args: &[&str]| client(&site.base, args);
    let (ok, _, err) = run(&["cancel", "r-2"]);
    assert!(ok, "{err}");
    let lines = |out: &str| {
        let mut l: Vec<String> = out.lines().map(str::to_owned).collect();
        l.sort();
        l
    };
    let (ok, out, err) = run(&["pause", "--name", "run-7"]);
    assert!(ok, "{err}");
    assert_eq!(lines(&out), ["r-1 paused", "r-3 paused"]);
    let (ok, out, err) = run(&["resume", "--name", "run-7"]);
    assert!(ok, "{err}");
    assert_eq!(lines(&out), ["r-1 queued", "r-3 queued"]);
    let (ok, out, err) = run(&["cancel", "--name", "run-7"]);
    assert!(ok, "{err}");
    assert_eq!(lines(&out), ["r-1 cancelled", "r-3 cancelled"]);
    let (ok, out, err) = run(&["cancel", "--name", "run-7"]);
    assert!(ok, "{out} {err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains(
            "none of the 3 tasks named \"run-7\" is queued or running or paused: nothing to cancel"
        ),
        "{err}"
    );
    let (_, out, _) = run(&["task", "other", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["task"]["status"], "queued", "another run untouched: {v}");
    let (ok, _, err) = run(&["cancel", "--name", "run-8"]);
    assert!(!ok);
    assert!(
        err.contains("no task named \"run-8\" at this coordinator"),
        "{err}"
    );
    let (ok, _, err) = run(&["cancel", "--name", "run-7", "r-1"]);
    assert!(!ok, "ids and --name are one or the other: {err}");
}

/// The result a cancelled running task sends is kept, not counted: `tether task` says why
/// (its attempt was cancelled), and the coordinator counts it apart from the stale results of
/// lost leases, which are a sign of a fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_tasks_late_result_is_shown_and_counted_as_a_cancel_not_a_lost_lease() {
    let site = Site::new();
    let _coord = site.coordinator().await;
    site.submit("cx", json!({"ms": 20000, "steps": 20})).await;
    let _w = worker(site.addr, "w1");
    let run = |args: &[&str]| client(&site.base, args);
    site.wait_running("cx").await;
    let (ok, out, err) = run(&["cancel", "cx"]);
    assert!(ok, "{out} {err}");
    let shown = tether_testkit::wait_for("the cancelled attempt's result", LONG, || async {
        let (_, out, _) = run(&["task", "cx"]);
        out.contains("not counted (task cancelled)").then_some(out)
    })
    .await;
    assert!(shown.contains("cancelled"), "{shown}");
    let o: serde_json::Value = site
        .http
        .get(format!("{}/api/v1/overview", site.base))
        .send()
        .await
        .expect("overview")
        .json()
        .await
        .expect("JSON");
    assert_eq!(o["counters"]["results_cancelled"], 1, "{o}");
    assert_eq!(o["counters"]["results_stale"], 0, "{o}");
}

/// A command task's checkpoint directory larger than the coordinator keeps: the coordinator
/// refuses it and `tether task` says so on the attempt (a resume would start from an earlier
/// checkpoint), instead of a line in the worker's log alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_too_large_for_the_coordinator_is_shown_on_the_task() {
    let site = Site::new();
    let mut cmd = tether();
    cmd.args(["--log", "warn", "coordinator", "--listen"])
        .arg(site.addr.to_string())
        .arg("--data-dir")
        .arg(site.dir.path())
        .args(["--max-checkpoint-bytes", "100000"]);
    let _coord = quiet(&mut cmd, "coordinator");
    wait_ready(&site.http, &site.base).await;
    // A checkpoint directory comes with a state directory.
    let state = tempfile::tempdir().expect("tempdir");
    let mut cmd = tether();
    cmd.args(["--log", "warn", "worker", "--coordinator"])
        .arg(&site.base)
        .args(["--id", "w1", "--state-dir"])
        .arg(state.path());
    let _w = quiet(&mut cmd, "worker");
    let run = |args: &[&str]| client(&site.base, args);
    let script = r#"head -c 200000 /dev/zero > "${TETHER_CHECKPOINT_DIR:?}/blob"; sleep 30"#;
    let config = json!({"shell": script, "checkpoint_poll_ms": 50});
    let spec = json!({"task_id": "big", "kind": "command", "config": config});
    submit_spec(&site.http, &site.base, spec).await;
    let shown = tether_testkit::wait_for("the refusal on the task", LONG, || async {
        let (_, out, _) = run(&["task", "big"]);
        out.contains("checkpoint refused").then_some(out)
    })
    .await;
    assert!(shown.contains("exceeds the limit of 100000"), "{shown}");
    let (ok, _, err) = run(&["cancel", "big"]);
    assert!(ok, "{err}");
}

/// A pause of a task whose worker is away is kept for it, not done: `tether pause` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_a_task_whose_worker_is_away_says_it_is_kept_for_the_worker() {
    let site = Site::new();
    let _coord = site.coordinator().await;
    site.submit("away", json!({"ms": 30000, "steps": 30})).await;
    let w = worker(site.addr, "w1");
    let run = |args: &[&str]| client(&site.base, args);
    site.wait_running("away").await;
    drop(w); // SIGKILL: the coordinator sees its worker go
    tether_testkit::wait_for("the worker to be away", LONG, || async {
        let (_, out, _) = run(&["workers", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (v[0]["state"] == "disconnected").then_some(())
    })
    .await;
    let (ok, out, err) = run(&["pause", "away"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "away paused");
    assert!(err.contains("its worker w1 is disconnected"), "{err}");
}

/// A worker without a state directory whose temporary directory is unusable (here a file)
/// runs command tasks without a checkpoint directory, instead of failing each at its making.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_temporary_directory_is_unusable_still_runs_command_tasks() {
    let site = Site::new();
    let _coord = site.coordinator().await;
    let not_a_dir = site.dir.path().join("tmp-file");
    std::fs::write(&not_a_dir, "").expect("write");
    let mut cmd = tether();
    cmd.args(["--log", "warn", "worker", "--coordinator"])
        .arg(&site.base)
        .args(["--id", "wt"])
        .env("TMPDIR", &not_a_dir);
    let _w = quiet(&mut cmd, "worker");
    let spec = json!({"task_id": "echo", "kind": "command", "config": {"shell": "echo hi"}});
    submit_spec(&site.http, &site.base, spec).await;
    let out = tether_testkit::wait_for("the task to end", LONG, || async {
        let (_, out, _) = client(&site.base, &["task", "echo", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let status = v["task"]["status"].as_str()?.to_owned();
        (status != "queued" && status != "running").then_some(v)
    })
    .await;
    assert_eq!(out["task"]["status"], "completed", "{out}");
    // A failed attempt's error is shown in the table, not only in --json.
    let spec =
        json!({"task_id": "nope", "kind": "command", "config": {"program": "/nonexistent/cmd"}});
    submit_spec(&site.http, &site.base, spec).await;
    let shown = tether_testkit::wait_for("the failure", LONG, || async {
        let (_, out, _) = client(&site.base, &["task", "nope"]);
        out.contains("attempt 1 error:").then_some(out)
    })
    .await;
    assert!(shown.contains("/nonexistent/cmd"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_all_reads_every_task_page_by_page_and_refuses_an_unknown_status() {
    let site = Site::new();
    let _coord = site.coordinator().await;
    let ids: Vec<String> = (0..7).map(|i| format!("t-{i}")).collect();
    for id in &ids {
        site.submit(id, json!({})).await;
    }
    let run = |args: &[&str]| client(&site.base, args);
    let listed = |out: &str| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(out).expect("JSON");
        v.as_array()
            .expect("a list")
            .iter()
            .map(|t| t["task_id"].as_str().expect("id").to_owned())
            .collect()
    };
    // Pages of three: 3 + 3 + 1, every task once, oldest first.
    let (ok, out, err) = run(&["tasks", "--all", "--limit", "3", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(listed(&out), ids);
    // Without --all, the limit is the most listed.
    let (ok, out, err) = run(&["tasks", "--limit", "3", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(listed(&out), ids[..3]);
    // --newest: the last three, the newest first.
    let (ok, out, err) = run(&["tasks", "--limit", "3", "--newest", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(listed(&out), ["t-6", "t-5", "t-4"]);
    let (_, _, err) = run(&["tasks", "--limit", "3", "--newest"]);
    assert!(err.contains("the newest 3 tasks"), "{err}");
    let (ok, out, err) = run(&["tasks", "--all", "--limit", "2", "--status", "queued"]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.contains("queued")).count(),
        7,
        "{out}"
    );
    let (ok, _, err) = run(&["tasks", "--status", "done"]);
    assert!(!ok);
    assert!(
        err.contains("possible values") && err.contains("completed"),
        "{err}"
    );
    let (ok, _, err) = run(&["tasks", "--limit", "0"]);
    assert!(!ok);
    assert!(err.contains("--limit"), "{err}");
    // Its reader gone before it wrote (`tether tasks | head -1`): it ends quietly and
    // successfully, as the reader asked, instead of panicking on the write.
    for format in [&["--json"][..], &[]] {
        let mut child = tether()
            .args(["tasks", "--all", "--limit", "1"])
            .args(format)
            .arg("--coordinator")
            .arg(&site.base)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tether tasks");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("tether tasks ends");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{format:?}: {}: {err}", out.status);
        assert!(!err.contains("panicked"), "{format:?}: {err}");
    }
    // A watch exists to report how its tasks end: with its reader gone, it fails, saying so.
    let mut child = tether()
        .args(["watch", "t-0", "--coordinator"])
        .arg(&site.base)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tether watch");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("tether watch ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("standard output was closed"), "{err}");
}

/// Reads one HTTP request from `s` (its head, then a body of its `content-length`): the body.
async fn request_body(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut s = tokio::io::BufReader::new(s);
    let mut length = 0;
    loop {
        let mut line = String::new();
        assert!(s.read_line(&mut line).await.expect("read") > 0, "cut off");
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().expect("a length");
        }
        if line == "\r\n" {
            let mut body = vec![0u8; length];
            s.read_exact(&mut body).await.expect("body");
            return body;
        }
    }
}

/// `submit --watch` whose coordinator goes away between taking the submission and the opening
/// of the event stream (a restart) keeps trying to follow the tasks, as a watch does through
/// restarts: they were taken, and the coordinator that took them is coming back. It gave up at
/// once (exit 2, "could not follow"), as it rightly does at an address that never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_watch_follows_tasks_taken_just_before_the_coordinator_went_away() {
    use tokio::io::AsyncWriteExt;
    let site = Site::new();
    let _coord = site.coordinator().await;
    // The submission goes to a stand-in at `front`, which passes it on to the coordinator and
    // closes its listener before it answers: the event stream is then refused there.
    let front = free_addr();
    let listener = tokio::net::TcpListener::bind(front).await.expect("bind");
    let (http, base) = (site.http.clone(), site.base.clone());
    let stand_in = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        drop(listener);
        let body = request_body(&mut s).await;
        let r = http
            .post(format!("{base}/api/v1/tasks"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("passed on");
        let status = r.status();
        let answer = r.bytes().await.expect("answer");
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n",
            answer.len()
        );
        s.write_all(head.as_bytes()).await.expect("head");
        s.write_all(&answer).await.expect("answer");
        status
    });
    let mut submit = Watcher::start(&[
        "submit",
        "--coordinator",
        &format!("http://{front}"),
        "--watch",
        "--id",
        "taken",
        "--shell",
        "true",
    ]);
    let status = stand_in.await.expect("the stand-in answered");
    assert_eq!(status.as_u16(), 201);
    // Refused at `front` now: the watch must not give up, but try again.
    let deadline = Instant::now() + LONG;
    while !submit
        .stderr_text()
        .contains("opening the event stream again")
    {
        if let Some(exit) = submit.try_wait() {
            panic!("gave up: {exit}; stderr: {}", submit.stderr_text());
        }
        assert!(Instant::now() < deadline, "{}", submit.stderr_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The coordinator is back at `front`.
    let _back = tether_faultproxy::Proxy::start(tether_faultproxy::ProxyConfig {
        name: "back".into(),
        listen: front,
        upstream: site.addr,
        seed: 1,
    })
    .await
    .expect("proxy");
    let _w = worker(site.addr, "w1");
    let (code, lines) = submit.wait_exit();
    assert_eq!(code, Some(0), "{lines:?}; stderr: {}", submit.stderr_text());
    assert_eq!(lines.first().map(String::as_str), Some("taken"));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("taken") && l.contains("completed")),
        "{lines:?}"
    );
}

/// A TCP relay to `upstream` that keeps every byte its clients send through it (the requests
/// they made, to count): its address and those bytes.
async fn recording_relay(
    upstream: SocketAddr,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = sent.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let kept = kept.clone();
            tokio::spawn(async move {
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let down =
                    tokio::spawn(
                        async move { tokio::io::copy(&mut from_server, &mut to_client).await },
                    );
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                    kept.lock().expect("kept").extend_from_slice(&buf[..n]);
                    if to_server.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = to_server.shutdown().await;
                let _ = down.await;
            });
        }
    });
    (addr, sent)
}

/// How many times `needle` occurs in `hay`.
fn occurrences(hay: &[u8], needle: &str) -> usize {
    hay.windows(needle.len())
        .filter(|w| *w == needle.as_bytes())
        .count()
}

/// A watch of more than 64 tasks submitted long ago looked for them, at its first catch-up,
/// in the coordinator's whole task listing, from its oldest task to its newest, page after
/// page (here 38 pages of 10, for 70 tasks): it reads the named tasks by their ids, one
/// listing request (`ids=`, 128 a request), and no other listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_of_many_tasks_submitted_long_ago_reads_them_by_their_ids_not_the_whole_listing() {
    let site = Site::new();
    let _coord = site.coordinator().await;
    let submit_all = |ids: Vec<String>| {
        let specs: Vec<_> = ids
            .iter()
            .map(|id| json!({ "task_id": id, "kind": "sleep", "config": {} }))
            .collect();
        let r = site
            .http
            .post(format!("{}/api/v1/tasks", site.base))
            .json(&json!({ "tasks": specs }))
            .send();
        async move {
            let r = r.await.expect("submit");
            assert!(r.status().is_success(), "submit: {}", r.status());
        }
    };
    // The named tasks first, then many others; the named ones ended (cancelled, queued with
    // no worker), so that the first catch-up finds every one ended and the watch exits.
    let named: Vec<String> = (0..70).map(|i| format!("old-{i}")).collect();
    submit_all(named.clone()).await;
    submit_all((0..300).map(|i| format!("other-{i}")).collect()).await;
    for id in &named {
        let (ok, _, err) = client(&site.base, &["cancel", id]);
        assert!(ok, "cancel {id}: {err}");
    }
    let (relay, sent) = recording_relay(site.addr).await;
    let through = format!("http://{relay}");
    let mut args = vec!["watch", "--coordinator", &through, "--page-size", "10"];
    args.extend(named.iter().map(String::as_str));
    let mut watch = Watcher::start(&args);
    let (code, lines) = watch.wait_exit();
    assert_eq!(
        code,
        Some(1),
        "none completed: {lines:?}; {}",
        watch.stderr_text()
    );
    for id in &named {
        let ended = format!("  {id}  cancelled");
        assert!(lines.iter().any(|l| l.contains(&ended)), "{id}: {lines:?}");
    }
    let sent = sent.lock().expect("sent").clone();
    assert_eq!(
        occurrences(&sent, "GET /api/v1/tasks?"),
        1,
        "one listing read: {}",
        String::from_utf8_lossy(&sent)
    );
    assert_eq!(
        occurrences(&sent, "GET /api/v1/tasks?limit=70&ids="),
        1,
        "by their ids: {}",
        String::from_utf8_lossy(&sent)
    );
    assert_eq!(occurrences(&sent, "GET /api/v1/tasks/"), 0);
    assert_eq!(occurrences(&sent, "GET /api/v1/events"), 1);
}

/// What a stand-in coordinator does with the task listing's `ids` filter.
#[derive(Clone, Copy, Debug, PartialEq)]
enum IdsFilter {
    /// Refuses the parameter (400), in the words of a coordinator before the filter.
    Refused,
    /// Filters (what a `TooLong` one does with a query it takes).
    Filtered,
    /// Filters, but a listing whose query is over [`LONGEST_QUERY`] is refused with this
    /// status (400, 414), as a proxy with a short request line limit does, in its words.
    TooLong(u16),
    /// Lists every task, as one that ignores parameters it does not know.
    Ignored,
    /// Filters, but answers busy (503) to every listing while the first event stream is open.
    BusyAtFirst,
}

/// The tasks a watch of [`stand_in_coordinator`] names.
const NAMED: [&str; 3] = ["n-0", "n-1", "n-2"];

impl IdsFilter {
    /// `TooLong` with its status when a listing of `query` is refused for its length, else
    /// `self`.
    fn too_long(self, query: &str) -> Self {
        match self {
            IdsFilter::TooLong(_) if query.len() > LONGEST_QUERY => self,
            IdsFilter::TooLong(_) => IdsFilter::Filtered,
            other => other,
        }
    }
}

/// The longest listing query an [`IdsFilter::TooLong`] stand-in takes.
const LONGEST_QUERY: usize = 1024;

/// A coordinator, stood in for by a small server, whose event stream sends three snapshots
/// (three catch-ups of the watch), then each of `named` completed; its listing takes `ids` as
/// `mode` says. Each listing's query (`LIST ...`) and each read of one task (`GET id`) is
/// written to `asked`, each busy answer as `BUSY`, each listing refused as too long as
/// `TOO LONG ...`.
async fn stand_in_coordinator(
    mode: IdsFilter,
    named: Vec<String>,
    asked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> String {
    use axum::extract::{Path, RawQuery};
    use axum::response::IntoResponse;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let running = |id: &str| {
        json!({
            "task_id": id, "status": "running", "attempt": 1, "submit_seq": 1,
            "updated_at": "2026-12-01T10:39:00Z", "lease": {"worker": "w1"},
        })
    };
    let opened = std::sync::Arc::new(AtomicUsize::new(0));
    let named = std::sync::Arc::new(named);
    let events = {
        let (opened, named) = (opened.clone(), named.clone());
        move || {
            opened.fetch_add(1, Ordering::SeqCst);
            let snapshot =
                "event: snapshot\ndata: {\"at\": \"2026-12-01T10:40:00Z\", \"tasks\": []}\n\n";
            let mut body = [snapshot; 3].join("event: resync\ndata: {}\n\n");
            for id in named.iter() {
                let mut t = running(id);
                t["status"] = json!("completed");
                t["updated_at"] = json!("2026-12-01T10:40:01Z");
                body.push_str(&format!("event: task\ndata: {t}\n\n"));
            }
            let held = futures_util::StreamExt::chain(
                futures_util::stream::once(async { Ok::<_, std::convert::Infallible>(body) }),
                futures_util::stream::pending(),
            );
            async move {
                (
                    [("content-type", "text/event-stream")],
                    axum::body::Body::from_stream(held),
                )
            }
        }
    };
    let list_asked = asked.clone();
    let list = move |RawQuery(raw): RawQuery| {
        let query = raw.unwrap_or_default();
        let busy = mode == IdsFilter::BusyAtFirst && opened.load(Ordering::SeqCst) < 2;
        let mut asked = list_asked.lock().expect("asked");
        if busy {
            asked.push("BUSY".into());
            let busy = axum::http::StatusCode::SERVICE_UNAVAILABLE;
            return std::future::ready(busy.into_response());
        }
        if let IdsFilter::TooLong(status) = mode.too_long(&query) {
            asked.push(format!("TOO LONG {query}"));
            let status = axum::http::StatusCode::from_u16(status).expect("a status");
            let said = "<html><body>Request-URI Too Large</body></html>";
            return std::future::ready((status, said).into_response());
        }
        asked.push(format!("LIST {query}"));
        let asked_for: Option<std::collections::BTreeSet<&str>> = query
            .split('&')
            .find_map(|p| p.strip_prefix("ids="))
            .map(|ids| ids.split(',').collect());
        let tasks: Vec<_> = match mode {
            IdsFilter::Refused if query.contains("ids=") => {
                // In the words of a coordinator before the filter (its query's fields checked).
                let said = "Failed to deserialize query string: unknown field `ids`, expected \
                            one of `status`, `limit`, `order`, `updated_since`, `after_seq`";
                let body = json!({"error": {"code": "bad_request", "message": said}});
                let refused = axum::http::StatusCode::BAD_REQUEST;
                return std::future::ready((refused, axum::Json(body)).into_response());
            }
            // Every task, one not named among them.
            IdsFilter::Ignored => named
                .iter()
                .map(String::as_str)
                .chain(["other-0"])
                .map(running)
                .collect(),
            _ => named
                .iter()
                .filter(|id| {
                    asked_for
                        .as_ref()
                        .is_none_or(|ids| ids.contains(id.as_str()))
                })
                .map(|id| running(id))
                .collect(),
        };
        std::future::ready(axum::Json(serde_json::Value::from(tasks)).into_response())
    };
    let one = move |Path(id): Path<String>| {
        asked.lock().expect("asked").push(format!("GET {id}"));
        std::future::ready(axum::Json(running(&id)))
    };
    let app = axum::Router::new()
        .route("/api/v1/events", axum::routing::get(events))
        .route("/api/v1/tasks", axum::routing::get(list))
        .route("/api/v1/tasks/{id}", axum::routing::get(one));
    support::serve(app).await
}

/// A watch against a coordinator that refuses the listing's `ids` filter (400) or ignores it
/// asked for it at every catch-up, a request wasted each time before the reads of one task
/// each: it asks once, and reads each named task by itself from then on. A coordinator that
/// was busy when first asked (503, asked again until the watch gave the catch-up up) is asked
/// for the filter again, and it serves every later catch-up: a busy answer says nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_asks_a_coordinator_without_the_ids_filter_for_it_once_not_at_every_catch_up() {
    for mode in [
        IdsFilter::Refused,
        IdsFilter::Ignored,
        IdsFilter::BusyAtFirst,
    ] {
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let named = NAMED.iter().map(|id| id.to_string()).collect();
        let base = stand_in_coordinator(mode, named, asked.clone()).await;
        let mut args = vec!["watch", "--coordinator", &base];
        args.extend(NAMED);
        let mut watch = Watcher::start(&args);
        let (code, lines) = watch.wait_exit();
        assert_eq!(
            code,
            Some(0),
            "{mode:?}: {lines:?}; {}",
            watch.stderr_text()
        );
        let asked = asked.lock().expect("asked").clone();
        let count = |what: &str| asked.iter().filter(|a| a.starts_with(what)).count();
        let by_ids = asked
            .iter()
            .filter(|a| a.starts_with("LIST ") && a.contains("ids="))
            .count();
        match mode {
            IdsFilter::Refused | IdsFilter::Ignored => {
                assert_eq!(by_ids, 1, "{mode:?}: asked once: {asked:?}");
                assert_eq!(count("LIST "), 1, "{mode:?}: {asked:?}");
                // Three catch-ups, each reading every named task by itself.
                assert_eq!(count("GET "), 3 * NAMED.len(), "{mode:?}: {asked:?}");
            }
            IdsFilter::Filtered | IdsFilter::TooLong(_) => unreachable!("not among the modes"),
            IdsFilter::BusyAtFirst => {
                assert!(count("BUSY") > 0, "{asked:?}");
                assert!(
                    watch
                        .stderr_text()
                        .contains("opening the event stream again"),
                    "{}",
                    watch.stderr_text()
                );
                // The second stream's three catch-ups, each by the filter.
                assert_eq!(by_ids, 3, "{asked:?}");
                assert_eq!(count("GET "), 0, "{asked:?}");
            }
        }
    }
}

/// A watch of named tasks whose listing by ids is refused for its length (400 or 414 from a
/// proxy with a short request line limit, not from a coordinator that lacks the filter) asks
/// for fewer ids a request, for the rest of the watch: every catch-up reads the names by the
/// filter, none by itself. A 400 turned the filter off for the rest of the watch, a request
/// per name at every catch-up; a 414 failed the catch-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_whose_listing_by_ids_is_refused_as_too_long_asks_for_fewer_a_request() {
    // Under the 64 read by ids at every catch-up; 60 of 40 bytes: 2.4 KiB of query.
    let named: Vec<String> = (0..60)
        .map(|i| format!("a-task-named-at-some-length-{i:012}"))
        .collect();
    for status in [400, 414] {
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mode = IdsFilter::TooLong(status);
        let base = stand_in_coordinator(mode, named.clone(), asked.clone()).await;
        let mut args = vec!["watch", "--coordinator", base.as_str()];
        args.extend(named.iter().map(String::as_str));
        let mut watch = Watcher::start(&args);
        let (code, lines) = watch.wait_exit();
        assert_eq!(
            code,
            Some(0),
            "{status}: {lines:?}; {}",
            watch.stderr_text()
        );
        let asked = asked.lock().expect("asked").clone();
        let count = |what: &str| asked.iter().filter(|a| a.starts_with(what)).count();
        assert_eq!(count("GET "), 0, "{status}: none read by itself: {asked:?}");
        let refused = count("TOO LONG ");
        assert!((1..=4).contains(&refused), "{status}: {asked:?}");
        // Refused at the first catch-up only: the later ones ask for fewer from the start.
        let first_taken = asked
            .iter()
            .position(|a| a.starts_with("LIST "))
            .expect("a listing");
        assert!(
            asked[first_taken..]
                .iter()
                .all(|a| !a.starts_with("TOO LONG ")),
            "{status}: {asked:?}"
        );
        let by_ids: Vec<&String> = asked.iter().filter(|a| a.starts_with("LIST ")).collect();
        assert!(
            by_ids.iter().all(|a| a.contains("ids=")),
            "{status}: {asked:?}"
        );
        // Every name at each of the three catch-ups, each once.
        let listed = |id: &str| {
            by_ids
                .iter()
                .filter(|a| a.split(['=', ',', '&']).any(|p| p == id))
                .count()
        };
        assert!(
            named.iter().all(|id| listed(id) == 3),
            "{status}: {asked:?}"
        );
    }
}

/// A task that checkpointed every couple of seconds made a line each time, and a watch of many
/// such tasks drowned the changes a user watches for. By default a checkpoint alone makes no
/// line: the task's next line names its latest checkpoint and how many came since; `--json`
/// still has every checkpoint (machines read it), and `--checkpoints` a line for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_folds_a_tasks_checkpoints_into_its_next_line_and_json_or_the_flag_shows_each() {
    let site = Site::new();
    let _coord = site.coordinator().await;
    // Nine checkpoints, 400 ms apart.
    let config = json!({"ms": 4000, "steps": 10, "checkpoint_every": 1});
    site.submit("cps", config).await;
    let base = site.base.as_str();
    let mut folded = Watcher::start(&["watch", "--coordinator", base, "cps"]);
    let mut json = Watcher::start(&["watch", "--coordinator", base, "--json", "cps"]);
    let mut each = Watcher::start(&["watch", "--coordinator", base, "--checkpoints", "cps"]);
    // Each follows the task before it runs: every checkpoint comes on its stream.
    folded.wait_line(&["cps", "queued"]);
    json.wait_line(&[r#""status":"queued""#]);
    each.wait_line(&["cps", "queued"]);
    let _w = worker(site.addr, "w1");
    let mut ended = Vec::new();
    for w in [&mut folded, &mut json, &mut each] {
        let (code, lines) = w.wait_exit();
        assert_eq!(code, Some(0), "{lines:?}; stderr: {}", w.stderr_text());
        ended.push(lines);
    }
    let [folded, json, each] = <[Vec<String>; 3]>::try_from(ended).expect("three watches");
    // Every checkpoint in the JSON, in order.
    let mut ids: Vec<String> = Vec::new();
    for l in &json {
        let t: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
        if let Some(c) = t["latest_checkpoint"]["checkpoint_id"].as_str()
            && ids.last().map(String::as_str) != Some(c)
        {
            ids.push(c.to_owned());
        }
    }
    assert!(ids.len() >= 5, "several checkpoints: {json:#?}");
    // The latest is the coordinator's.
    let (ok, out, err) = client(&site.base, &["task", "cps", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let latest = ids.last().expect("a checkpoint");
    assert_eq!(v["task"]["latest_checkpoint"]["checkpoint_id"], **latest);
    // `--checkpoints`: a line each, each once.
    for id in &ids {
        let with = each
            .iter()
            .filter(|l| l.contains(&format!("checkpoint {id} ")));
        assert_eq!(with.count(), 1, "{id}: {each:#?}");
    }
    // By default: fewer lines than checkpoints, still every change, and the latest checkpoint
    // named with how many came.
    assert!(folded.len() < ids.len(), "{folded:#?}");
    let has = |parts: &[&str]| folded.iter().any(|l| parts.iter().all(|p| l.contains(p)));
    assert!(has(&["cps", "running", "on w1"]), "{folded:#?}");
    let count = format!("{} since the last line", ids.len());
    assert!(
        has(&["cps", "completed", &format!("checkpoint {latest} "), &count]),
        "{folded:#?}"
    );
}
