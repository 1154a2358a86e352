//! The `tether` binary's client commands against a coordinator on a loopback port (a fake one,
//! or a real one in this process): what they print, and when.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;
use support::Watcher;

/// A task as the listing gives it.
fn task(seq: u64) -> Value {
    json!({
        "task_id": format!("t-{seq}"),
        "status": "queued",
        "attempt": 0,
        "submit_seq": seq,
        "spec": {"kind": "command", "priority": 5},
    })
}

/// A coordinator whose listing has three tasks, in pages of two: it answers the second page
/// once `printed` is set, or after 10 s; whether it was set by then is sent on `seen`.
async fn paged_coordinator(
    printed: Arc<AtomicBool>,
    seen: tokio::sync::mpsc::UnboundedSender<bool>,
) -> String {
    let list = move |axum::extract::Query(q): axum::extract::Query<
        std::collections::HashMap<String, String>,
    >| {
        let (printed, seen) = (printed.clone(), seen.clone());
        async move {
            if q.get("after_seq").map(String::as_str) != Some("2") {
                return axum::Json(json!([task(1), task(2)]));
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !printed.load(Ordering::SeqCst) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = seen.send(printed.load(Ordering::SeqCst));
            axum::Json(json!([task(3)]))
        }
    };
    let app = axum::Router::new().route("/api/v1/tasks", axum::routing::get(list));
    support::serve(app).await
}

/// `tether tasks --all` prints each page as it comes, not the whole listing once read (which
/// it held in memory): the first page's tasks are on its output before the second is asked
/// for, and the JSON is one array still.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_all_prints_each_page_before_asking_for_the_next() {
    for json in [true, false] {
        let printed = Arc::new(AtomicBool::new(false));
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let base = paged_coordinator(printed.clone(), seen_tx).await;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
        cmd.args(["tasks", "--all", "--limit", "2", "--coordinator", &base])
            .env_remove("TETHER_LOG")
            .env_remove("TETHER_TOKEN")
            .env_remove("TETHER_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd.spawn().expect("run tether tasks");
        let mut stdout = child.stdout.take().expect("stdout");
        // Reads the output as it comes; says when the first page's last task is on it.
        let reader = std::thread::spawn(move || {
            let (mut out, mut buf) = (Vec::new(), [0u8; 4096]);
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => return out,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
                if String::from_utf8_lossy(&out).contains("t-2") {
                    printed.store(true, Ordering::SeqCst);
                }
            }
        });
        let status = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("joined")
            .expect("tether tasks ends");
        let out = String::from_utf8(reader.join().expect("reader")).expect("UTF-8");
        let err = String::from_utf8_lossy(&status.stderr);
        assert!(status.status.success(), "json {json}: {err}");
        assert_eq!(
            seen.recv().await,
            Some(true),
            "json {json}: the first page was printed before the second was asked for: {out}"
        );
        if json {
            let v: Value = serde_json::from_str(&out).expect("one JSON array");
            let ids: Vec<&str> = v
                .as_array()
                .expect("an array")
                .iter()
                .filter_map(|t| t["task_id"].as_str())
                .collect();
            assert_eq!(ids, ["t-1", "t-2", "t-3"]);
            assert_eq!(out.lines().count(), 1, "{out}");
        } else {
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 4, "a head and three rows: {out}");
            assert!(lines[0].starts_with("TASK"), "{out}");
            assert!(lines[3].starts_with("t-3"), "{out}");
        }
    }
}

/// Runs `tether` with `args` and no token from the environment: its whole output.
async fn tether_output<S: AsRef<std::ffi::OsStr> + Send + 'static>(
    args: Vec<S>,
) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(args)
            .env_remove("TETHER_LOG")
            .env_remove("TETHER_TOKEN")
            .env_remove("TETHER_TOKEN_FILE")
            .stdin(Stdio::null())
            .output()
    })
    .await
    .expect("joined")
    .expect("run tether")
}

/// Runs `tether` with `args` and no token from the environment: exit code and stderr.
async fn run_tether(args: Vec<std::ffi::OsString>) -> (Option<i32>, String) {
    let out = tether_output(args).await;
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `submit --file` sends the file as it is written, so the coordinator's refusal is about the
/// file: an array is said to be one (made over into `{"tasks": [...]}`, it became an array in
/// the list, refused as `tasks[0][0]: invalid type`), and a fault is placed at the file's own
/// line, not at a column of the one line the client had made of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_file_sends_the_file_as_written_so_errors_are_about_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coord = tether_testkit::spawn_coordinator(dir.path().join("data")).await;
    let base = format!("http://{}", coord.addr);
    let submit = |file: &std::path::Path| {
        let args = ["submit", "--coordinator", &base, "--file"];
        let mut args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        args.push(file.into());
        run_tether(args)
    };
    let array = dir.path().join("array.json");
    std::fs::write(&array, r#"[{"kind": "sleep", "config": {}}]"#).expect("write");
    let (code, err) = submit(&array).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("array"), "{err}");
    assert!(!err.contains("tasks[0][0]"), "{err}");
    let bad_field = dir.path().join("bad.json");
    std::fs::write(
        &bad_field,
        "{\n  \"kind\": \"sleep\",\n  \"priority\": \"urgent\",\n  \"config\": {}\n}\n",
    )
    .expect("write");
    let (code, err) = submit(&bad_field).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("priority") && err.contains("line 3"), "{err}");
    // A file that is no JSON is refused before it is sent, at its own line.
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{\n  \"kind\": \"sleep\",\n  \"config\": {\n}\n").expect("write");
    let (code, err) = submit(&broken).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is not JSON") && err.contains("line 5"),
        "{err}"
    );
    // One spec and a list of them are taken as before.
    let one = dir.path().join("one.json");
    std::fs::write(&one, "{\"kind\": \"sleep\", \"config\": {}}").expect("write");
    let (code, err) = submit(&one).await;
    assert_eq!(code, Some(0), "{err}");
    let list = dir.path().join("list.json");
    std::fs::write(
        &list,
        r#"{"tasks": [{"kind": "sleep", "config": {}}, {"kind": "sleep", "config": {}}]}"#,
    )
    .expect("write");
    let (code, err) = submit(&list).await;
    assert_eq!(code, Some(0), "{err}");
    coord.stop().await;
}

/// Each line of `tether tasks`' table under the head above it: a cell of every column starts
/// where the head's word does, after a gap of two spaces at least. Lines and why not, if not.
fn misaligned(out: &str) -> Vec<String> {
    let mut starts: Option<Vec<usize>> = None;
    let mut bad = Vec::new();
    for line in out.lines() {
        if line.starts_with("TASK ") {
            starts = Some(
                line.match_indices(|c: char| c != ' ')
                    .filter(|(i, _)| *i == 0 || line.as_bytes()[i - 1] == b' ')
                    .map(|(i, _)| i)
                    .collect(),
            );
            continue;
        }
        let Some(starts) = &starts else {
            bad.push(format!("a row before any head: {line:?}"));
            continue;
        };
        let b = line.as_bytes();
        let aligned = starts
            .iter()
            .skip(1)
            .all(|&at| at < b.len() && b[at] != b' ' && b[at - 1] == b' ' && b[at - 2] == b' ');
        if !aligned {
            bad.push(format!("{line:?} under columns at {starts:?}"));
        }
    }
    bad
}

/// `tether tasks --all` prints its table a page at a time, each column as wide as its widest
/// cell so far: a later page with a longer task id widened the columns from there on, under a
/// head sized for the first page, so its rows and those after stood off the head's columns.
/// A page that widens a column starts under a head of its own; every row is aligned with the
/// head above it, and a page that needs no more width gets no head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_all_rows_stay_under_their_heads_columns_when_a_later_page_is_wider() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coord = tether_testkit::spawn_coordinator(dir.path().join("data")).await;
    let base = format!("http://{}", coord.addr);
    // Pages of two: short ids, then a long one, then short ones again.
    let long = format!("a-task-id-much-longer-than-the-others-{}", "x".repeat(40));
    let ids = ["t-1", "t-2", &long, "t-4", "t-5"];
    let specs: Vec<Value> = ids
        .iter()
        .map(|id| json!({"task_id": id, "kind": "sleep", "config": {}}))
        .collect();
    let r = reqwest::Client::new()
        .post(format!("{base}/api/v1/tasks"))
        .json(&json!({ "tasks": specs }))
        .send()
        .await
        .expect("submit");
    assert!(r.status().is_success(), "submit: {}", r.status());
    let out = tether_output(vec![
        "tasks".to_owned(),
        "--all".into(),
        "--limit".into(),
        "2".into(),
        "--coordinator".into(),
        base.clone(),
    ])
    .await;
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = text.lines().filter(|l| !l.starts_with("TASK ")).collect();
    assert_eq!(rows.len(), ids.len(), "{text}");
    for (row, id) in rows.iter().zip(ids) {
        assert!(row.starts_with(&format!("{id} ")), "{id}: {text}");
    }
    assert_eq!(misaligned(&text), Vec::<String>::new(), "{text}");
    // The first page's head, and one where the long id widened the table.
    let heads: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("TASK "))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(heads, [0, 3], "{text}");
    coord.stop().await;
}

/// A `submit --file` larger than the coordinator's `--max-body` is said plainly: larger than
/// the coordinator accepts, its limit named, and what to do (split the file). It was axum's
/// own "Failed to buffer the request body: length limit exceeded (HTTP 413)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_file_over_the_body_limit_is_said_plainly_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = tether_testkit::fast_coordinator_config(dir.path().join("data"));
    cfg.max_body = 64 * 1024;
    let coord = tether_testkit::spawn_coordinator_with(cfg, None).await;
    let big = dir.path().join("big.json");
    let name = "n".repeat(1000);
    let spec = json!({"kind": "sleep", "config": {}, "name": name});
    let specs: Vec<Value> = std::iter::repeat_n(spec, 100).collect();
    std::fs::write(&big, json!({ "tasks": specs }).to_string()).expect("write");
    let base = format!("http://{}", coord.addr);
    let args = ["submit", "--coordinator", &base, "--file"];
    let mut args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
    args.push(big.clone().into());
    let (code, err) = run_tether(args).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("larger than this coordinator accepts: at most 65536 bytes (its --max-body)"),
        "{err}"
    );
    assert!(err.contains(&format!("split {}", big.display())), "{err}");
    assert!(err.contains("(HTTP 413)"), "{err}");
    assert!(!err.contains("Failed to buffer"), "{err}");
    coord.stop().await;
}

/// `tether submit --id X` sent again with the same spec (its first reply lost: a script's
/// retry under `set -e`) exits 0, prints the id as the first did and says on stderr that the
/// task was already submitted; nothing is made twice. With another spec under the id it is
/// refused (exit 1), naming what differs. It was refused as a duplicate (HTTP 409), exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_sent_again_with_the_same_id_exits_0_saying_it_was_already_submitted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coord = tether_testkit::spawn_coordinator(dir.path().join("data")).await;
    let base = format!("http://{}", coord.addr);
    let submit = |extra: &[&str]| {
        let mut args: Vec<String> = ["submit", "--coordinator", &base, "--id", "nightly-7"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.extend(["--shell".to_owned(), "make bench".to_owned()]);
        tether_output(args)
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let first = submit(&["--env", "MODE=full"]).await;
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert_eq!(text(&first.stdout), "nightly-7\n");
    assert!(
        !text(&first.stderr).contains("already"),
        "{}",
        text(&first.stderr)
    );

    let again = submit(&["--env", "MODE=full"]).await;
    let err = text(&again.stderr);
    assert_eq!(again.status.code(), Some(0), "{err}");
    assert_eq!(text(&again.stdout), "nightly-7\n", "the same output: {err}");
    assert!(
        err.contains("task nightly-7 was already submitted (same spec)"),
        "{err}"
    );

    let other = submit(&["--env", "MODE=quick"]).await;
    let err = text(&other.stderr);
    assert_eq!(other.status.code(), Some(1), "{err}");
    assert!(
        err.contains("task nightly-7 already exists with a different spec: its `config` differs"),
        "{err}"
    );
    assert!(err.contains("(HTTP 409)"), "{err}");

    let client = coord.client();
    let (status, v) = client.get("/api/v1/tasks").await;
    assert_eq!(status, 200, "{v}");
    let listed = v.as_array().expect("a listing");
    assert_eq!(listed.len(), 1, "one task: {v}");
    assert_eq!(listed[0]["spec"]["config"]["env"]["MODE"], "full", "{v}");
    coord.stop().await;
}

/// A run's tasks by their name: `tether tasks --name` lists those submitted under it, and
/// only those (a name with characters a URL gives meaning to among them), with `--status` and
/// `--all` alike; the API refuses a name no task can have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_by_name_lists_a_runs_tasks_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coord = tether_testkit::spawn_coordinator(dir.path().join("data")).await;
    let base = format!("http://{}", coord.addr);
    let odd = "run 7&status=failed+x";
    let mut ids: std::collections::HashMap<&str, Vec<String>> = Default::default();
    for (name, n) in [("nightly-42", 3), (odd, 2), ("nightly-43", 1)] {
        for _ in 0..n {
            let args = [
                "submit",
                "--coordinator",
                &base,
                "--name",
                name,
                "--kind",
                "sleep",
            ];
            let out = tether_output(args.map(str::to_owned).to_vec()).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            ids.entry(name).or_default().push(id);
        }
    }
    let client = coord.client();
    let (_, v) = client
        .post(
            &format!("/api/v1/tasks/{}/cancel", ids["nightly-42"][1]),
            &json!({}),
        )
        .await;
    assert_eq!(v["status"], "cancelled", "{v}");
    let listed = |extra: &[&str]| {
        let mut args = vec!["tasks", "--coordinator", &base, "--json"];
        args.extend(extra);
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        async move {
            let out = tether_output(args).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
            v.as_array()
                .expect("a listing")
                .iter()
                .map(|t| t["task_id"].as_str().expect("an id").to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(&["--name", "nightly-42"]).await, ids["nightly-42"]);
    assert_eq!(listed(&["--name", odd, "--all"]).await, ids[odd]);
    assert_eq!(
        listed(&["--name", "nightly-42", "--status", "queued"]).await,
        [ids["nightly-42"][0].clone(), ids["nightly-42"][2].clone()]
    );
    assert!(
        listed(&["--name", "nightly"]).await.is_empty(),
        "exact names only"
    );
    let (status, v) = client
        .get(&format!("/api/v1/tasks?name={}", "n".repeat(1025)))
        .await;
    assert_eq!(status, 422, "{v}");

    // A run from a file: --name names every task of it; one the file names otherwise is
    // refused before any request.
    let file = dir.path().join("run.json");
    let spec = |name: Option<&str>| {
        let mut s = json!({"kind": "sleep", "config": {"ms": 1}});
        if let Some(n) = name {
            s["name"] = json!(n);
        }
        s
    };
    let from_file = |name: &str| {
        let args = ["submit", "--coordinator", &base, "--name", name, "--file"];
        let mut args: Vec<String> = args.map(str::to_owned).to_vec();
        args.push(file.display().to_string());
        tether_output(args)
    };
    let two = json!({"tasks": [spec(None), spec(Some("nightly-45"))]});
    std::fs::write(&file, two.to_string()).expect("write the file");
    let out = from_file("nightly-45").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(listed(&["--name", "nightly-45"]).await, made);
    std::fs::write(&file, spec(Some("other")).to_string()).expect("write the file");
    let out = from_file("nightly-45").await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("task 0 is named \"other\""), "{err}");
    // Made over to be named, a file's lines are gone by the time the coordinator reads it: a
    // spec it would refuse is said here, where in the file.
    let bad = "{\"tasks\": [\n  {\"kind\": \"sleep\",\n   \"priority\": \"x\"}]}";
    std::fs::write(&file, bad).expect("write the file");
    let out = from_file("nightly-45").await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert_eq!(
        listed(&["--name", "nightly-45"]).await.len(),
        2,
        "nothing sent"
    );

    // `tether watch --name` follows a run to its end: the other runs' tasks completed by a
    // worker, nightly-42's last two cancelled meanwhile.
    let watch = |name: &str| {
        let args = ["watch", "--coordinator", &base, "--name", name];
        tether_output(args.map(str::to_owned).to_vec())
    };
    let following = tokio::spawn(watch("nightly-42"));
    let (first, last) = (&ids["nightly-42"][0], &ids["nightly-42"][2]);
    let out = tether_output(
        ["cancel", "--coordinator", &base, first, last]
            .map(str::to_owned)
            .to_vec(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = tether_testkit::fast_worker_config(&coord.ws_url(), "w1");
    let worker = tether_testkit::spawn_worker(cfg, tether_worker::Executors::builtin());
    let run = watch("nightly-43").await;
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "all completed: {err}");
    assert!(
        err.contains("following the 1 tasks named \"nightly-43\""),
        "{err}"
    );
    let run = following.await.expect("joined");
    assert_eq!(run.status.code(), Some(1), "all ended, not all completed");
    let said = String::from_utf8_lossy(&run.stdout);
    for id in &ids["nightly-42"] {
        assert!(said.contains(id.as_str()), "{id}: {said}");
    }
    let run = watch("nightly-44").await;
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no task named \"nightly-44\" at this coordinator"),
        "{err}"
    );
    worker.stop().await.expect("the worker stops");
    coord.stop().await;
}

/// A relative `--cwd` is a usage error (exit 2) naming the flag, before any request: the
/// directory is the worker's, and a relative one would depend on where the worker was
/// started. It was sent, and failed only on the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_with_a_relative_cwd_is_a_usage_error_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coord = tether_testkit::spawn_coordinator(dir.path().join("data")).await;
    let base = format!("http://{}", coord.addr);
    for cwd in ["rel/dir", "./here", "~/bench", ""] {
        let args = ["submit", "--coordinator", &base, "--cwd", cwd, "--", "true"];
        let (code, err) = run_tether(args.iter().map(Into::into).collect()).await;
        assert_eq!(code, Some(2), "{cwd:?}: {err}");
        assert!(
            err.contains("--cwd") && err.contains("must be an absolute path on the worker"),
            "{cwd:?}: {err}"
        );
    }
    let (status, v) = coord.client().get("/api/v1/tasks").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!([]), "nothing was sent");
    let args = [
        "submit",
        "--coordinator",
        &base,
        "--cwd",
        "/tmp",
        "--",
        "true",
    ];
    let (code, err) = run_tether(args.iter().map(Into::into).collect()).await;
    assert_eq!(code, Some(0), "an absolute one is taken: {err}");
    coord.stop().await;
}

/// The cell of column `head` in each line of a table (`out`) whose first cell is `first`: the
/// text under the head's word, up to the next column's (a cell may hold a space: `3s ago`).
fn cell<'a>(out: &'a str, first: &str, head: &str) -> &'a str {
    let mut lines = out.lines();
    let top = lines.next().expect("a head");
    let starts: Vec<usize> = top
        .match_indices(|c: char| c != ' ')
        .filter(|(i, _)| *i == 0 || top.as_bytes()[i - 1] == b' ')
        .map(|(i, _)| i)
        .collect();
    let col = starts
        .iter()
        .position(|&at| top[at..].split(' ').next() == Some(head))
        .unwrap_or_else(|| panic!("no column {head}: {out}"));
    let row = lines
        .find(|l| l.split(' ').next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first}: {out}"));
    let end = starts.get(col + 1).map_or(row.len(), |&e| e.min(row.len()));
    row[starts[col].min(row.len())..end].trim()
}

/// The value of `key` in `tether workers ID`'s output: the rest of the line it starts.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .filter(|rest| rest.starts_with("  "))
                .map(str::trim)
        })
        .unwrap_or_else(|| panic!("no {key}: {out}"))
}

/// `tether workers` against a real coordinator and a real worker whose path was cut for a
/// while: the table has the failed attempts (FAILED) and the next backoff (BACKOFF_S) an
/// operator watching a flaky network looks for, as the API reports them; `tether workers ID`
/// shows that worker, one field a line: its state, tasks, labels and every connection
/// statistic it reported, with the report's age; `--json` is the API's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_shows_failed_attempts_and_one_worker_with_every_statistic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coord = tether_testkit::spawn_coordinator(dir.path().join("data")).await;
    let base = format!("http://{}", coord.addr);
    let relay = tether_testkit::Relay::start(coord.addr).await;
    let mut cfg = tether_testkit::fast_worker_config(&relay.url(), "flaky-1");
    cfg.tags.insert("os".into(), "linux".into());
    let worker = tether_testkit::spawn_worker(cfg, tether_worker::Executors::builtin());
    let connected = |s: tether_worker::ConnState| s == tether_worker::ConnState::Connected;
    worker.wait_state(connected).await;
    // Cut off: attempts fail until the path is back.
    relay.cut();
    let deadline = Duration::from_secs(30);
    let handle = &worker.handle;
    tether_testkit::wait_for("failed connection attempts", deadline, || async move {
        (handle.stats().failed_connections >= 2).then_some(())
    })
    .await;
    relay.restore();
    worker.wait_state(connected).await;
    let client = coord.client();
    let task = client
        .submit(&[tether_testkit::sleep_task(60_000, 1, 0)])
        .await;
    let task = task[0].to_string();
    let (client, task) = (&client, task.as_str());
    // A report from after the cut, and the task leased to the worker.
    let api = tether_testkit::wait_for("a report of the failures", deadline, || async move {
        let (status, w) = client.get("/api/v1/workers/flaky-1").await;
        let failed = w["stats"]["failed_connections"].as_u64().unwrap_or(0);
        let reconnected = w["stats"]["reconnects"].as_u64().unwrap_or(0) >= 1;
        let leased = w["leases"] == json!([task]);
        // A round trip measured, so that the RTT lines are figures (a report at a reconnect
        // may come before the first).
        let measured = w["stats"]["rtt_samples"].as_u64().unwrap_or(0) >= 1;
        (status == 200 && failed >= 2 && reconnected && leased && measured).then_some(w)
    })
    .await;
    let failed = api["stats"]["failed_connections"].to_string();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();

    let out = tether_output(
        ["workers", "--coordinator", base.as_str()]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let table = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(cell(&table, "flaky-1", "FAILED"), failed, "{table}");
    assert_eq!(cell(&table, "flaky-1", "STATE"), "connected", "{table}");
    assert_eq!(cell(&table, "flaky-1", "TASKS"), "1", "{table}");
    let backoff = cell(&table, "flaky-1", "BACKOFF_S");
    let secs: f64 = backoff
        .parse()
        .unwrap_or_else(|_| panic!("{backoff}: {table}"));
    assert!(secs > 0.0, "{table}");
    assert!(
        cell(&table, "flaky-1", "REPORTED").ends_with("s ago"),
        "{table}"
    );

    let one = |extra: &[&str]| {
        let mut args: Vec<String> = ["workers", "flaky-1", "--coordinator", base.as_str()]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        tether_output(args)
    };
    let out = one(&[]).await;
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(field(&shown, "worker"), "flaky-1", "{shown}");
    assert_eq!(field(&shown, "state"), "connected", "{shown}");
    assert_eq!(field(&shown, "slots"), "2", "{shown}");
    assert_eq!(field(&shown, "tasks"), task, "{shown}");
    assert_eq!(field(&shown, "capabilities"), "cpu", "{shown}");
    assert_eq!(field(&shown, "tags"), "os=linux", "{shown}");
    assert!(field(&shown, "executors").contains("sleep"), "{shown}");
    assert_eq!(field(&shown, "failed"), failed, "{shown}");
    assert!(field(&shown, "reported").ends_with("s ago)"), "{shown}");
    // Every statistic, under its key.
    for key in [
        "connection",
        "attempts",
        "successful",
        "success rate",
        "disconnections",
        "reconnects",
        "reconnect avg",
        "reconnect max",
        "rtt samples",
        "rtt avg",
        "rtt p50",
        "rtt p95",
        "rtt p99",
        "heartbeat every",
        "heartbeat timeout",
        "send rate",
        "stability",
        "backoff factor",
        "next backoff",
        "first seen",
        "last seen",
    ] {
        let v = field(&shown, key);
        assert!(!v.is_empty() && v != "-", "{key}: {shown}");
    }
    let reconnects: u64 = field(&shown, "reconnects").parse().expect("a count");
    assert!(reconnects >= 1, "{shown}");

    let out = one(&["--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["worker_id"], "flaky-1", "{v}");
    assert_eq!(
        v["stats"]["failed_connections"],
        api["stats"]["failed_connections"]
    );
    assert_eq!(v["leases"], api["leases"], "{v}");
    assert!(v["stats"]["rtt_p99_ms"].is_number(), "{v}");

    let _ = worker.stop().await;
    coord.stop().await;
}

/// `tether workers ID` of a worker the coordinator does not know is an error naming it, with
/// the exit code of `tether task` for an unknown task (1); an id the id rules refuse is a
/// usage error (exit 2) before any request (its coordinator here is a closed port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_an_unknown_id_is_an_error_and_a_bad_id_refused_before_any_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coord = tether_testkit::spawn_coordinator(dir.path().join("data")).await;
    let base = format!("http://{}", coord.addr);
    let args = |words: &[&str]| words.iter().map(Into::into).collect::<Vec<_>>();
    let (code, err) = run_tether(args(&["workers", "nobody", "--coordinator", &base])).await;
    let (task_code, task_err) = run_tether(args(&["task", "t-none", "--coordinator", &base])).await;
    assert_eq!(task_code, Some(1), "{task_err}");
    assert_eq!(code, task_code, "{err}");
    assert!(
        err.contains("no worker nobody at this coordinator"),
        "{err}"
    );
    assert!(err.contains("`tether workers` lists"), "{err}");
    coord.stop().await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let closed = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    for bad in ["bad id!", "x/../other", ".."] {
        let (code, err) = run_tether(args(&["workers", bad, "--coordinator", &closed])).await;
        assert_eq!(code, Some(2), "{bad:?}: {err}");
        assert!(
            err.contains("invalid value") && err.contains("[WORKER_ID]"),
            "{bad:?}: {err}"
        );
        assert!(!err.contains("cannot reach"), "{bad:?}: {err}");
    }
    // The same closed port, an id the rules take: the request is made, and fails.
    let (code, err) = run_tether(args(&["workers", "w-1", "--coordinator", &closed])).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot reach"), "{err}");
}

/// A closed loopback port: a request to it fails with `cannot reach`.
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let closed = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    closed
}

/// A `--file` spec whose config its built-in executor refuses (a `sleep` with a key it does not
/// have, a `command` with no program) is a usage error (exit 2) naming the file, the task and
/// the key, before any request (the coordinator is a closed port), as the same config from the
/// flags is: it was sent and refused with HTTP 422 (exit 1). A kind no built-in executor runs
/// is left to the coordinator, so it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_file_whose_config_its_executor_refuses_is_a_usage_error_before_any_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = closed_port().await;
    let submit = |text: &str, name: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, text).expect("write");
        let args = ["submit", "--coordinator", &closed, "--file"];
        let mut args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        args.push(file.into());
        run_tether(args)
    };
    let (code, err) = submit(r#"{"kind":"sleep","config":{"msec":100}}"#, "sleep.json").await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("sleep.json: task 0: the `sleep` executor refuses its config")
            && err.contains("msec"),
        "{err}"
    );
    assert!(!err.contains("cannot reach"), "{err}");
    let list =
        r#"{"tasks": [{"kind":"sleep","config":{}}, {"kind":"command","config":{"args":["x"]}}]}"#;
    let (code, err) = submit(list, "list.json").await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("task 1: the `command` executor refuses its config"),
        "{err}"
    );
    assert!(!err.contains("cannot reach"), "{err}");
    // Valid configs and a kind of the fleet's own reach the (closed) coordinator.
    for (text, name) in [
        (r#"{"kind":"sleep","config":{"ms":100}}"#, "good.json"),
        (r#"{"kind":"custom","config":{"any":1}}"#, "custom.json"),
    ] {
        let (code, err) = submit(text, name).await;
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(err.contains("cannot reach"), "{name}: {err}");
    }
}

/// `tether tasks` against a real coordinator and a real worker whose path is cut while it runs
/// a task: during the coordinator's grace the row still says `running` on that worker (the
/// API's state, as scripts read it), and a line on stderr names the task, its worker as
/// disconnected and what becomes of it; with the worker connected, before the cut and once it
/// is back, there is no such line. `tether task ID` says the same line then, and only then;
/// so does `tether watch ID`, once, whether it was following when the worker went (from the
/// worker's event) or began after (from the stream's snapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_task_and_watch_name_a_running_task_whose_worker_is_disconnected_on_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = tether_testkit::fast_coordinator_config(dir.path().join("data"));
    // The grace outlasts the test: the task stays `running` on its worker while it is away.
    cfg.lost_after = Duration::from_secs(600);
    let coord = tether_testkit::spawn_coordinator_with(cfg, None).await;
    let base = format!("http://{}", coord.addr);
    let relay = tether_testkit::Relay::start(coord.addr).await;
    let cfg = tether_testkit::fast_worker_config(&relay.url(), "away-1");
    let worker = tether_testkit::spawn_worker(cfg, tether_worker::Executors::builtin());
    let client = coord.client();
    let task = client
        .submit(&[tether_testkit::sleep_task(120_000, 1, 0)])
        .await;
    let task = task[0].to_string();
    let deadline = Duration::from_secs(30);
    let state_is = |want: &'static str| {
        let client = &client;
        tether_testkit::wait_for(want, deadline, move || async move {
            let (_, w) = client.get("/api/v1/workers/away-1").await;
            (w["state"] == want && w["leases"].as_array().is_some_and(|l| l.len() == 1))
                .then_some(())
        })
    };
    let tasks = || {
        tether_output(
            ["tasks", "--coordinator", base.as_str()]
                .map(String::from)
                .to_vec(),
        )
    };
    let one = || {
        tether_output(
            ["task", &task, "--coordinator", &base]
                .map(String::from)
                .to_vec(),
        )
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    state_is("connected").await;
    let out = tasks().await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "connected: no hint");
    let out = one().await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "connected: no hint from task");
    // Following the task from before the cut: its line says it runs on the worker.
    let mut before = Watcher::start(&["watch", &task, "--coordinator", &base]);
    before.wait_line(&["on away-1"]);
    assert_eq!(before.stderr_text(), "", "connected: no hint from watch");

    relay.cut();
    state_is("disconnected").await;
    let hint = "(worker away-1 disconnected ";
    let hinted = |err: &str| {
        err.contains(hint)
            && err.contains(&format!("running task(s) {task} wait"))
            && err.contains("--lost-after")
    };
    let err = before.wait_stderr(hint, deadline).await;
    assert!(hinted(&err), "watch, from the event: {err}");
    let mut after = Watcher::start(&["watch", &task, "--coordinator", &base]);
    let err = after.wait_stderr(hint, deadline).await;
    assert!(hinted(&err), "watch, from the snapshot: {err}");
    let out = one().await;
    let (shown, err) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{err}");
    assert!(shown.contains("status    running"), "{shown}");
    assert!(hinted(&err), "task: {err}");
    let out = tasks().await;
    let (table, err) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{err}");
    assert_eq!(cell(&table, &task, "STATUS"), "running", "{table}");
    assert_eq!(cell(&table, &task, "WORKER"), "away-1", "{table}");
    assert!(
        err.contains("worker away-1 disconnected")
            && err.contains(&format!("running task(s) {task} wait"))
            && err.contains("--lost-after"),
        "{err}"
    );
    // `--all` says it too.
    let out = tether_output(
        ["tasks", "--all", "--coordinator", base.as_str()]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert!(
        text(&out.stderr).contains("worker away-1 disconnected"),
        "{}",
        text(&out.stderr)
    );

    relay.restore();
    state_is("connected").await;
    let out = tasks().await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "back: no hint");
    let out = one().await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "back: no hint from task");
    for (watch, what) in [(&mut before, "the event"), (&mut after, "the snapshot")] {
        assert!(watch.try_wait().is_none(), "still following, from {what}");
        let err = watch.stderr_text();
        assert_eq!(
            err.matches(hint).count(),
            1,
            "said once, from {what}: {err}"
        );
    }
    let _ = worker.stop().await;
    coord.stop().await;
}

/// `tether submit --kind sleep --config JSON` submits a `sleep` task with that config, as a
/// file would; a config its executor refuses, or a command given to a `sleep`, is a usage
/// error (exit 2) before any request (nothing reaches the coordinator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_kind_and_config_send_a_task_of_that_kind_and_a_bad_config_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coord = tether_testkit::spawn_coordinator(dir.path().join("data")).await;
    let base = format!("http://{}", coord.addr);
    let submit = |extra: &[&str]| {
        let mut args = vec!["submit", "--coordinator", &base, "--kind", "sleep"];
        args.extend_from_slice(extra);
        run_tether(args.iter().map(Into::into).collect())
    };
    for bad in [
        &["--config", r#"{"msec": 100}"#][..],
        &["--config", r#"{"ms": "long"}"#],
        &["--", "true"],
    ] {
        let (code, err) = submit(bad).await;
        assert_eq!(code, Some(2), "{bad:?}: {err}");
    }
    let (status, v) = coord.client().get("/api/v1/tasks").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!([]), "nothing was sent");
    let (code, err) = submit(&["--id", "s-1", "--config", r#"{"ms": 100, "steps": 2}"#]).await;
    assert_eq!(code, Some(0), "{err}");
    let (status, t) = coord.client().get("/api/v1/tasks/s-1").await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["spec"]["kind"], "sleep", "{t}");
    assert_eq!(t["spec"]["config"], json!({"ms": 100, "steps": 2}), "{t}");
    coord.stop().await;
}
