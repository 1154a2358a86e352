//! `tether drain`, `tether undrain` and `tether retry` against a real coordinator and workers in
//! this process: a drained worker finishes what it holds and takes nothing new, through a
//! restart of the coordinator, until undrained; `--wait` ends when it holds nothing, or at its
//! limit. An ended task runs again as a new task with its spec; a task that retries on failure
//! runs again as its next attempt; a run is judged, and reported, by its latest tries.

use std::time::Duration;

use tether_proto::{TaskId, TaskSpec};
use tether_testkit::*;
use tether_worker::{ConnState, Executors};

#[path = "support/cli_proc.rs"]
mod cli_proc;
use cli_proc::{LONG, run, text};

/// A `tether` run against `base`: the command, for a caller to await or hold.
fn tether_cmd(base: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = cli_proc::tether();
    cmd.args(args)
        .args(["--coordinator", base])
        .env_remove("TETHER_LOG");
    cmd
}

/// Runs `tether` with `args` against `base`; its exit code, stdout and stderr.
async fn tether(base: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = run(&mut tether_cmd(base, args)).await;
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

fn worker(c: &TestCoordinator, id: &str) -> TestWorker {
    spawn_worker(fast_worker_config(&c.ws_url(), id), Executors::builtin())
}

/// A `command` task that runs until `go` exists (a minute at most).
fn held_until(go: &std::path::Path) -> TaskSpec {
    TaskSpec::new(
        "command",
        serde_json::json!({
            "shell": r#"i=0; while [ ! -e "$GO" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done"#,
            "env": {"GO": go},
        }),
    )
}

/// A worker learns of its drain and undrain at once, not at its next heartbeat's reply: with
/// heartbeats a minute apart, within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_told_of_its_drain_at_once_not_at_its_next_heartbeat() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().join("c"));
    cfg.heartbeat_interval = Duration::from_secs(60);
    cfg.heartbeat_timeout = Duration::from_secs(180);
    let c = spawn_coordinator_with(cfg, None).await;
    let base = format!("http://{}", c.addr);
    let mut wc = fast_worker_config(&c.ws_url(), "w1");
    wc.heartbeat_interval = Duration::from_secs(60);
    wc.heartbeat_timeout = Duration::from_secs(180);
    let w = spawn_worker(wc, Executors::builtin());
    w.wait_state(|s| s == ConnState::Connected).await;
    for (command, want) in [("drain", true), ("undrain", false)] {
        let (code, out, err) = tether(&base, &[command, "w1"]).await;
        assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
        let at_once = tokio::time::timeout(Duration::from_secs(10), async {
            while w.handle.drained() != want {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        assert!(at_once.await.is_ok(), "{command}: told within 10 s");
    }
    w.stop().await.expect("w1 stops");
    c.stop().await;
}

/// A `command` task named `name` that fails, in its one attempt, until `ok` exists.
fn fails_until(ok: &std::path::Path, name: &str) -> TaskSpec {
    let mut spec = TaskSpec::new(
        "command",
        serde_json::json!({"shell": r#"[ -e "$OK" ]"#, "env": {"OK": ok}}),
    );
    spec.max_attempts = Some(1);
    spec.name = Some(name.into());
    spec
}

/// A run `name` of two tasks, submitted and waited for until each ended: the first failed
/// ([`fails_until`] `ok`, which does not exist yet), the second completed. Their ids.
async fn one_failed_one_passed(client: &Client, ok: &std::path::Path, name: &str) -> Vec<TaskId> {
    let fails = fails_until(ok, name);
    let mut passes = fails.clone();
    passes.config = serde_json::json!({"shell": "true"}).into();
    let run = client.submit(&[fails, passes]).await;
    client.wait_status(&run[0], "failed").await;
    client.wait_status(&run[1], "completed").await;
    run
}

/// The coordinator judges run `name` by the same rule as `tether report` (`GET /api/v1/runs`,
/// written apart from the client's reading of the run): its verdict, flaky count, latest
/// tries by status and how many are retries agree with `report` (`--json`'s document).
async fn agrees_with_the_coordinator(client: &Client, name: &str, report: &serde_json::Value) {
    let (_, runs) = client.get(&format!("/api/v1/runs?name={name}")).await;
    let run = &runs[0];
    let said = format!("{runs}\n{report}");
    let passed = if report["passed"] == true {
        "passed"
    } else {
        "failed"
    };
    assert_eq!(run["verdict"], passed, "{said}");
    assert_eq!(run["flaky"], report["flaky"], "{said}");
    assert_eq!(run["by_status"], report["counts"], "{said}");
    let tasks = report["tasks"].as_array().expect("tasks");
    assert_eq!(run["tasks"].as_u64(), Some(tasks.len() as u64), "{said}");
    let retried = tasks
        .iter()
        .filter(|t| t["tries"].as_u64() > Some(1))
        .count();
    assert_eq!(run["retried"].as_u64(), Some(retried as u64), "{said}");
}

/// Waits until worker `w` knows it is drained (`want`) or not, from its heartbeat replies;
/// fails the test, saying `what`, if it did not within [`LONG`].
async fn told(w: &TestWorker, want: bool, what: &str) {
    wait_for(what, LONG, || async {
        (w.handle.drained() == want).then_some(())
    })
    .await;
}

/// What a `tether drain --wait` started with its stdout piped printed, once it ended with exit
/// 0 within [`LONG`] (else the test fails, saying `what`).
async fn waited(waiting: &mut tokio::process::Child, what: &str) -> String {
    let out = tokio::time::timeout(LONG, waiting.wait())
        .await
        .expect(what)
        .expect("wait");
    assert_eq!(out.code(), Some(0));
    let mut said = String::new();
    tokio::io::AsyncReadExt::read_to_string(waiting.stdout.as_mut().expect("piped"), &mut said)
        .await
        .expect("read");
    said
}

/// A coordinator in `dir` with worker w1 connected; the API's base URL and a client.
async fn one_worker(dir: &tempfile::TempDir) -> (TestCoordinator, String, Client, TestWorker) {
    let c = spawn_coordinator(dir.path().join("c")).await;
    let base = format!("http://{}", c.addr);
    let client = c.client();
    let w = worker(&c, "w1");
    w.wait_state(|s| s == ConnState::Connected).await;
    (c, base, client, w)
}

/// The worker that ran `id`'s last attempt.
async fn ran_on(client: &Client, id: &TaskId) -> String {
    let t = client.task(id).await;
    t["attempts"][0]["worker"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_finishes_its_task_takes_nothing_new_and_stays_drained_until_undrained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().join("c")).await;
    let addr = c.addr;
    let base = format!("http://{addr}");
    let client = c.client();
    let w1 = worker(&c, "w1");
    w1.wait_state(|s| s == ConnState::Connected).await;
    let go = dir.path().join("go");
    let long = client.submit(&[held_until(&go)]).await.remove(0);
    client.wait_status(&long, "running").await;

    let (code, out, err) = tether(&base, &["drain", "w1"]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains(&format!(
            "worker w1 drained: it takes no new task until `tether undrain w1`; it holds 1 task \
             ({long}), which run on to their end"
        )),
        "{out}"
    );
    let draining = |text: &str| metric_value(text, "tether_workers_draining", &[]);
    assert_eq!(
        draining(&scrape(&format!("{base}/metrics")).await),
        Some(1.0)
    );
    told(&w1, true, "the worker is told by its heartbeat replies").await;
    // A wait bounded below the task's run ends at its limit, saying what is held.
    let (code, out, err) = tether(&base, &["drain", "w1", "--wait=1s"]).await;
    assert_eq!(code, Some(1), "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains(&format!("worker w1 still holds 1 task ({long}) after 1s")),
        "{err}"
    );
    // An unbounded wait runs on meanwhile.
    let mut waiting = tether_cmd(&base, &["drain", "w1", "--wait"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start tether drain --wait");

    // A new task waits in the queue: the only worker is drained.
    let quick = client.submit(&[sleep_task(10, 1, 0)]).await.remove(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client.status(&quick).await, "queued");
    // `tether task` says why it waits.
    let (code, out, err) = tether(&base, &["task", quick.as_str()]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("waiting   1 connected worker can run it: 1 drained (tether undrain)"),
        "{out}"
    );
    let (code, out, _) = tether(&base, &["workers"]).await;
    assert_eq!(code, Some(0));
    let row = out
        .lines()
        .find(|l| l.starts_with("w1 "))
        .expect("w1's row");
    assert!(row.contains("draining"), "{out}");
    // Another worker takes it.
    let w2 = worker(&c, "w2");
    client.wait_status(&quick, "completed").await;
    assert_eq!(ran_on(&client, &quick).await, "w2");

    // The held task ends: the wait ends with it.
    std::fs::write(&go, b"").expect("release the task");
    client.wait_status(&long, "completed").await;
    let said = waited(&mut waiting, "the wait ended once the worker held nothing").await;
    assert!(said.contains("worker w1 holds no task"), "{said}");
    let (_, out, _) = tether(&base, &["workers", "w1"]).await;
    assert!(
        out.contains("drained (connected; drained: it takes no new task, and holds none)"),
        "{out}"
    );

    // The coordinator restarts on the same address and data: w1 is still drained. With w2
    // gone, a new task waits for w1 until it is undrained.
    w2.stop().await.expect("w2 stops");
    c.stop().await;
    let c = spawn_coordinator_with(fast_coordinator_config(dir.path().join("c")), Some(addr)).await;
    w1.wait_state(|s| s == ConnState::Connected).await;
    let client = c.client();
    let (_, record) = client.get("/api/v1/workers/w1").await;
    assert_eq!(record["draining"], true, "{record}");
    let after = client.submit(&[sleep_task(10, 1, 0)]).await.remove(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client.status(&after).await, "queued");
    // The new session's heartbeat replies (a few in the half second) say it too: one that
    // did not would have put the worker's word back to undrained.
    assert!(w1.handle.drained(), "still told after the restart");
    let (code, out, err) = tether(&base, &["undrain", "w1"]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("worker w1 undrained: it takes tasks again"),
        "{out}"
    );
    client.wait_status(&after, "completed").await;
    assert_eq!(ran_on(&client, &after).await, "w1");
    told(&w1, false, "told it is undrained").await;
    assert_eq!(
        draining(&scrape(&format!("{base}/metrics")).await),
        Some(0.0)
    );

    // A worker the coordinator does not know, and an id no worker may have.
    let (code, _, err) = tether(&base, &["drain", "nobody"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no worker nobody at this coordinator"),
        "{err}"
    );
    let (code, _, err) = tether(&base, &["drain", "no/such"]).await;
    assert_eq!(code, Some(2), "{err}");
    w1.stop().await.expect("w1 stops");
    c.stop().await;
}

/// A rolling restart's first step: `tether drain` of several workers at once drains each
/// (one unknown is said and fails the command, the others drained all the same), and `--wait`
/// ends once every one of them holds nothing, each said as it empties; `tether undrain` puts
/// several back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_undrain_of_several_workers_act_on_each_and_wait_for_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().join("c")).await;
    let base = format!("http://{}", c.addr);
    let client = c.client();
    let (w1, w2) = (worker(&c, "w1"), worker(&c, "w2"));
    w1.wait_state(|s| s == ConnState::Connected).await;
    w2.wait_state(|s| s == ConnState::Connected).await;
    let (go1, go2) = (dir.path().join("go1"), dir.path().join("go2"));
    let held = client.submit(&[held_until(&go1), held_until(&go2)]).await;
    for id in &held {
        client.wait_status(id, "running").await;
    }
    let (code, out, err) = tether(&base, &["drain", "w1", "nobody", "w2", "w1"]).await;
    assert_eq!(code, Some(1), "stdout: {out}\nstderr: {err}");
    let drained: Vec<&str> = out.lines().collect();
    assert_eq!(drained.len(), 2, "each once, in the order given: {out}");
    assert!(drained[0].starts_with("worker w1 drained"), "{out}");
    assert!(drained[1].starts_with("worker w2 drained"), "{out}");
    assert!(
        err.contains("worker nobody: no worker nobody at this coordinator"),
        "{err}"
    );
    assert!(err.contains("1 of 3 workers not drained"), "{err}");
    for w in ["w1", "w2"] {
        let (_, record) = client.get(&format!("/api/v1/workers/{w}")).await;
        assert_eq!(record["draining"], true, "{record}");
    }
    // The wait ends only when both hold nothing: one released first, it waits on.
    let mut waiting = tether_cmd(&base, &["drain", "w1", "w2", "--wait=1m"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start tether drain --wait");
    std::fs::write(&go1, b"").expect("release one task");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        waiting.try_wait().expect("try_wait").is_none(),
        "the wait ended with a task still held"
    );
    std::fs::write(&go2, b"").expect("release the other");
    let said = waited(&mut waiting, "the wait ended once both held nothing").await;
    for w in ["w1", "w2"] {
        assert!(
            said.contains(&format!("worker {w} holds no task")),
            "{said}"
        );
    }
    let (code, out, err) = tether(&base, &["undrain", "w1", "w2"]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "worker w1 undrained: it takes tasks again",
            "worker w2 undrained: it takes tasks again"
        ]
    );
    w1.stop().await.expect("w1 stops");
    w2.stop().await.expect("w2 stops");
    c.stop().await;
}

/// A run's failures run again as a run of their own: `tether retry --of RUN --name NEW` takes
/// the tasks of RUN that ended without completing (not the completed), names the new ones NEW,
/// and `tether watch --name NEW` follows them to their end. The first run is judged by its
/// latest tries: its failure retried to completion, it passes, and has nothing to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_of_a_run_submits_its_unfinished_tasks_again_as_a_new_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, base, client, w) = one_worker(&dir).await;
    let ok = dir.path().join("ok");
    let tasks = one_failed_one_passed(&client, &ok, "run-1").await;

    std::fs::write(&ok, b"").expect("the file it needs");
    let (code, out, err) = tether(&base, &["retry", "--of", "run-1", "--name", "run-1-r1"]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "the failed one only: {out}");
    assert!(
        lines[0].ends_with(&format!(" (retry of {})", tasks[0])),
        "{out}"
    );
    let (code, out, err) = tether(&base, &["watch", "--name", "run-1-r1"]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let (code, out, _) = tether(&base, &["tasks", "--name", "run-1", "--json"]).await;
    assert_eq!(code, Some(0));
    let run: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        run.as_array().map(Vec::len),
        Some(2),
        "the first run as it was: {run}"
    );
    let (code, out, err) = tether(&base, &["report", "--name", "run-1", "--json"]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        (&report["passed"], &report["flaky"]),
        (&serde_json::json!(true), &serde_json::json!(1)),
        "{report}"
    );
    agrees_with_the_coordinator(&client, "run-1", &report).await;
    for run in ["run-1-r1", "run-1"] {
        let (code, out, err) = tether(&base, &["retry", "--of", run]).await;
        assert_eq!((code, out.as_str()), (Some(0), ""), "{run}: {err}");
        assert!(err.contains("nothing to retry"), "{run}: {err}");
    }
    let (code, out, err) = tether(&base, &["watch", "--name", "run-1"]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("latest tries of the 2 tasks named \"run-1\": 2 tasks (1 of them retries named otherwise)"),
        "{err}"
    );
    let (code, _, err) = tether(&base, &["retry", "--of", "run-2"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no task named \"run-2\""), "{err}");
    w.stop().await.expect("w1 stops");
    c.stop().await;
}

/// Retries that join their run (no `--name`): `tether retry --of RUN` again takes the latest
/// try of each task, the retry that failed and not the failure it repeated, so no task is run
/// again twice; `tether watch --name RUN` follows the latest tries, and passes once the last
/// retry completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_of_a_run_again_takes_only_its_latest_tries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, base, client, w) = one_worker(&dir).await;
    let ok = dir.path().join("ok");
    let run = one_failed_one_passed(&client, &ok, "run-3").await;

    let retried = |out: &str| -> Vec<(TaskId, String)> {
        // (With --watch, the watch's lines follow.)
        out.lines()
            .filter(|l| l.contains(" (retry of "))
            .map(|l| {
                let (id, of) = l.split_once(' ').expect("an id and its original");
                (TaskId::parse(id).expect("a task id"), of.to_owned())
            })
            .collect()
    };
    let (code, out, err) = tether(&base, &["retry", "--of", "run-3"]).await;
    assert_eq!(code, Some(0), "{err}");
    let first = retried(&out);
    assert_eq!(first.len(), 1, "{out}");
    assert_eq!(first[0].1, format!("(retry of {})", run[0]));
    client.wait_status(&first[0].0, "failed").await;
    let (code, out, err) = tether(&base, &["watch", "--name", "run-3"]).await;
    assert_eq!(code, Some(1), "the latest try failed: {out}\n{err}");
    assert!(
        err.contains("latest tries of the 3 tasks named \"run-3\": 2 tasks (0 of"),
        "{err}"
    );
    // Its report: the failure, with the worker's error, in the table and in JUnit XML.
    let junit = dir.path().join("run-3.xml");
    let junit_arg = junit.to_str().expect("a UTF-8 path");
    let (code, out, err) =
        tether(&base, &["report", "--name", "run-3", "--junit", junit_arg]).await;
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains("1 of the 2 tasks of run \"run-3\" did not complete"),
        "{err}"
    );
    assert!(
        out.contains(&format!("{} failed: exit status 1", first[0].0)),
        "{out}"
    );
    let xml = std::fs::read_to_string(&junit).expect("the JUnit file");
    assert!(
        xml.contains(r#"<testsuite name="run-3" tests="2" failures="1" errors="0" skipped="0""#),
        "{xml}"
    );
    assert!(
        xml.contains(r#"<failure message="exit status 1" type="failed""#),
        "{xml}"
    );

    // Again: the retry that failed, not the task it repeated.
    std::fs::write(&ok, b"").expect("the file it needs");
    let (code, out, err) = tether(&base, &["retry", "--of", "run-3", "--watch"]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let second = retried(&out);
    assert_eq!(second.len(), 1, "{out}");
    assert_eq!(second[0].1, format!("(retry of {})", first[0].0));
    let (code, out, err) = tether(&base, &["watch", "--name", "run-3"]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let (code, out, err) = tether(&base, &["report", "--name", "run-3", "--json"]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["passed"], true, "{report}");
    let (code, _, err) = tether(
        &base,
        &["report", "--name", "run-3", "--json", "--junit", "-"],
    )
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("both write to stdout"), "{err}");
    assert_eq!(report["flaky"], 1, "{report}");
    let tries: Vec<(&str, u64)> = report["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| {
            (
                t["task_id"].as_str().unwrap_or(""),
                t["tries"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        tries,
        [(second[0].0.as_str(), 3), (run[1].as_str(), 1)],
        "{report}"
    );
    agrees_with_the_coordinator(&client, "run-3", &report).await;
    let (code, _, err) = tether(&base, &["retry", "--of", "run-3"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("nothing to retry"), "{err}");
    let all = client.get("/api/v1/tasks?name=run-3").await.1;
    assert_eq!(all.as_array().map(Vec::len), Some(4), "{all}");
    w.stop().await.expect("w1 stops");
    c.stop().await;
}

/// `tether submit --retry-on failed`: a flaky command that fails its first attempt and passes
/// its second ends completed, through a real worker; both attempts' results are kept, the
/// first not counted. Asked with one attempt, it is refused before any request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_retries_on_failure_passes_on_its_second_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, base, client, w) = one_worker(&dir).await;
    let mark = dir.path().join("ran-once");
    let env = format!("MARK={}", mark.display());
    // Its second attempt leaves its figures in its result file.
    let flaky = r#"if [ -e "$MARK" ]; then printf '{"p50_ms": 2.5}' > "$TETHER_RESULT_FILE"; exit 0; fi
        touch "$MARK"; echo flaky >&2; exit 3"#;
    let submit = |more: &[&str]| {
        let mut args = vec!["submit", "--name", "flaky", "--env", &env, "--shell", flaky];
        args.extend_from_slice(more);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let args = submit(&["--retry-on", "failed", "--max-attempts", "1"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = tether(&base, &args).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--max-attempts 2 or more"), "{err}");
    assert_eq!(
        client.get("/api/v1/tasks").await.1.as_array().map(Vec::len),
        Some(0),
        "nothing submitted"
    );

    let args = submit(&["--retry-on", "failed,timed_out", "--watch"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = tether(&base, &args).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let all = client.get("/api/v1/tasks").await.1;
    let t = &all[0];
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(
        t["spec"]["retry_on"],
        serde_json::json!(["failed", "timed_out"])
    );
    assert_eq!(attempt_ends(t), ["failed", "completed"], "{t}");
    let id = TaskId::parse(t["task_id"].as_str().expect("id")).expect("a task id");
    let (_, results) = client.get(&format!("/api/v1/tasks/{id}/result")).await;
    let mut stale: Vec<(u64, bool)> = results
        .as_array()
        .expect("results")
        .iter()
        .map(|r| (r["attempt"].as_u64().unwrap_or(0), r["stale"] == true))
        .collect();
    stale.sort_unstable();
    assert_eq!(stale, [(1, true), (2, false)], "{results}");
    let (code, out, err) =
        tether(&base, &["report", "--name", "flaky", "--outputs", "--json"]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let task = &report["tasks"][0];
    assert_eq!(
        task["output"],
        serde_json::json!({"p50_ms": 2.5}),
        "{report}"
    );
    assert_eq!(
        (&task["flaky"], &task["attempts"]),
        (&serde_json::json!(true), &serde_json::json!(2))
    );
    let (code, out, err) = tether(&base, &["task", id.as_str()]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("retries   on failed, timed_out\n"), "{out}");
    w.stop().await.expect("w1 stops");
    c.stop().await;
}

/// `tether retry` submits an ended task's spec again as a new task, and `--watch` follows it:
/// a task that failed for want of a file completes once the file is there. A task not ended
/// is refused, and nothing is submitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_runs_an_ended_task_again_as_a_new_task_with_its_spec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, base, client, w) = one_worker(&dir).await;
    let ok = dir.path().join("ok");
    let spec = fails_until(&ok, "needs-ok");
    let first = client.submit(&[spec]).await.remove(0);
    client.wait_status(&first, "failed").await;

    std::fs::write(&ok, b"").expect("the file it needs");
    let (code, out, err) = tether(&base, &["retry", "--watch", first.as_str()]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let line = out
        .lines()
        .find(|l| l.ends_with(&format!(" (retry of {first})")))
        .unwrap_or_else(|| panic!("a line naming the retry: {out}"));
    let again = TaskId::parse(line.split(' ').next().expect("an id")).expect("a task id");
    assert_ne!(again, first);
    let (old, new) = (client.task(&first).await, client.task(&again).await);
    assert_eq!(new["status"], "completed", "{new}");
    assert_eq!(
        old["status"], "failed",
        "the first stays as it ended: {old}"
    );
    for field in ["kind", "config", "name", "max_attempts", "priority"] {
        assert_eq!(old["spec"][field], new["spec"][field], "{field}");
    }

    let held = client
        .submit(&[held_until(&ok.with_extension("never"))])
        .await;
    client.wait_status(&held[0], "running").await;
    let before = client.get("/api/v1/tasks").await.1.as_array().map(Vec::len);
    let (code, _, err) = tether(&base, &["retry", held[0].as_str()]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is running: only an ended task is run again"),
        "{err}"
    );
    let (code, _, err) = tether(&base, &["retry", again.as_str(), "t-nobody"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no task t-nobody at this coordinator"),
        "{err}"
    );
    // A task has one retry, recorded on both.
    let (code, _, err) = tether(&base, &["retry", first.as_str()]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("task {first} was retried already, by {again}")),
        "{err}"
    );
    let (code, out, err) = tether(&base, &["task", first.as_str()]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&format!("retried   by {again}\n")), "{out}");
    let (_, out, _) = tether(&base, &["task", again.as_str()]).await;
    assert!(out.contains(&format!("retry of  {first}\n")), "{out}");
    let after = client.get("/api/v1/tasks").await.1.as_array().map(Vec::len);
    assert_eq!(before, after, "nothing submitted");
    client.control(&held[0], "cancel").await;
    w.stop().await.expect("w1 stops");
    c.stop().await;
}

/// `tether retry` of more tasks than the coordinator takes in one submission sends them in
/// parts: every task is submitted again once, each line naming its original, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_of_more_tasks_than_one_submission_takes_sends_them_in_parts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().join("c"));
    cfg.max_submit_batch = 3;
    let c = spawn_coordinator_with(cfg, None).await;
    let base = format!("http://{}", c.addr);
    let client = c.client();
    // Ended without a worker: cancelled while queued.
    let specs: Vec<TaskSpec> = (0..7)
        .map(|i| {
            let mut spec = TaskSpec::new("sleep", serde_json::json!({"ms": 1}));
            spec.name = Some(format!("part-{i}"));
            spec
        })
        .collect();
    let mut old = Vec::new();
    for part in specs.chunks(3) {
        old.extend(client.submit(part).await);
    }
    for id in &old {
        client.control(id, "cancel").await;
        client.wait_status(id, "cancelled").await;
    }
    let mut args = vec!["retry"];
    args.extend(old.iter().map(TaskId::as_str));
    let (code, out, err) = tether(&base, &args).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), old.len(), "{out}");
    let mut new = std::collections::BTreeSet::new();
    for (i, (line, old)) in lines.iter().zip(&old).enumerate() {
        let (id, of) = line.split_once(' ').expect("an id and its original");
        assert_eq!(of, format!("(retry of {old})"), "{out}");
        let t = client.task(&TaskId::parse(id).expect("a task id")).await;
        assert_eq!(t["spec"]["name"], format!("part-{i}"), "{t}");
        assert_eq!(t["status"], "queued", "{t}");
        assert!(new.insert(id.to_owned()), "{id} twice: {out}");
    }
    let all = client.get("/api/v1/tasks").await.1;
    assert_eq!(
        all.as_array().map(Vec::len),
        Some(2 * old.len()),
        "each submitted again once: {all}"
    );
    // Each is retried already: refused before any request, whatever the parts.
    let (code, _, err) = tether(&base, &args).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("was retried already"), "{err}");
    // The retries, ended, retried in their turn; with --json: one document, each new id
    // beside the one it is a retry of.
    let new: Vec<TaskId> = new
        .iter()
        .map(|id| TaskId::parse(id).expect("id"))
        .collect();
    for id in &new {
        client.control(id, "cancel").await;
        client.wait_status(id, "cancelled").await;
    }
    let mut args = vec!["retry", "--json"];
    args.extend(new.iter().map(TaskId::as_str));
    let (code, out, err) = tether(&base, &args).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON document");
    let of: Vec<&str> = new.iter().map(TaskId::as_str).collect();
    assert_eq!(v["retry_of"], serde_json::json!(of), "{v}");
    assert_eq!(
        v["task_ids"].as_array().map(Vec::len),
        Some(old.len()),
        "{v}"
    );
    let all = client.get("/api/v1/tasks").await.1;
    assert_eq!(all.as_array().map(Vec::len), Some(3 * old.len()), "{all}");
    // A file of more tasks than a submission takes is refused whole, saying what to do.
    let file = tempfile::NamedTempFile::new().expect("a file");
    let four: Vec<TaskSpec> = (0..4)
        .map(|_| TaskSpec::new("sleep", serde_json::json!({"ms": 1})))
        .collect();
    std::fs::write(
        file.path(),
        serde_json::json!({ "tasks": four }).to_string(),
    )
    .expect("write");
    let path = file.path().to_str().expect("a UTF-8 path");
    let (code, _, err) = tether(&base, &["submit", "--file", path]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("into several files"), "{err}");
    let after = client.get("/api/v1/tasks").await.1;
    assert_eq!(
        after.as_array().map(Vec::len),
        Some(3 * old.len()),
        "none made"
    );
    c.stop().await;
}

/// `tether runs` lists the newest runs as the coordinator judges them, by their latest tries:
/// a run with a failure fails, and passes once that failure's retry completed (under any
/// name); `--name` asks for one, `--json` gives the API's answer.
#[tokio::test]
async fn runs_lists_each_run_by_its_latest_tries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, base, client, w) = one_worker(&dir).await;
    let ok = dir.path().join("ok");
    one_failed_one_passed(&client, &ok, "run-9").await;
    let (code, out, err) = tether(&base, &["runs"]).await;
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("RUN "), "{out}");
    let row: Vec<&str> = lines[1].split("  ").filter(|c| !c.is_empty()).collect();
    assert_eq!(
        row[..6].iter().map(|c| c.trim()).collect::<Vec<_>>(),
        ["run-9", "failed", "2", "1 completed, 1 failed", "0", "0"],
        "{out}"
    );
    let (code, out, err) = tether(&base, &["report", "--name", "run-9", "--json"]).await;
    assert_eq!(code, Some(1), "a run that failed: {err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    agrees_with_the_coordinator(&client, "run-9", &report).await;

    std::fs::write(&ok, b"").expect("the file it needs");
    let (code, out, err) = tether(
        &base,
        &["retry", "--of", "run-9", "--name", "run-9-r1", "--watch"],
    )
    .await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let (code, out, err) = tether(&base, &["runs", "--name", "run-9", "--json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let runs: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(runs.as_array().map(Vec::len), Some(1), "{runs}");
    assert_eq!(
        (&runs[0]["verdict"], &runs[0]["tasks"], &runs[0]["retried"]),
        (
            &serde_json::json!("passed"),
            &serde_json::json!(2),
            &serde_json::json!(1)
        ),
        "{runs}"
    );
    assert_eq!(runs[0]["by_status"], serde_json::json!({"completed": 2}));
    assert_eq!(runs[0]["flaky"], 1, "completed after a failure: {runs}");
    // Newest first: the retry's own run, then the first.
    let (code, out, _) = tether(&base, &["runs", "--limit", "1"]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("run-9-r1 ")),
        "{out}"
    );
    assert_eq!(out.lines().count(), 2, "{out}");
    let (code, out, err) = tether(&base, &["runs", "--name", "no-such-run"]).await;
    assert_eq!((code, out.as_str()), (Some(0), ""), "{err}");
    assert!(err.contains("no task named \"no-such-run\""), "{err}");
    w.stop().await.expect("w1 stops");
    c.stop().await;
}
