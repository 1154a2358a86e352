//! A real `tether worker` process killed with SIGKILL and started again on the same
//! `--state-dir`: tasks that died with it are reported lost and resume from their checkpoint,
//! and results it had not delivered are delivered exactly once. Started again without one,
//! its task runs again as a new attempt from its checkpoint.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tether_testkit::*;

/// Generous: the worker is a separate process on a small, busy machine.
const LONG: Duration = Duration::from_secs(60);

/// A `tether worker` child process, killed (SIGKILL) when dropped.
struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    fn start(addr: SocketAddr, state_dir: &Path, log: &Path) -> Self {
        Self::start_with(addr, Some(state_dir), log)
    }

    /// Without a state directory (`None`): each process a stranger to the one before.
    fn start_with(addr: SocketAddr, state_dir: Option<&Path>, log: &Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("worker log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
        cmd.args(["--log", "info", "worker", "--coordinator"])
            .arg(format!("ws://{addr}"))
            .args(["--id", "w1", "--slots", "2"]);
        if let Some(dir) = state_dir {
            cmd.arg("--state-dir").arg(dir);
        }
        let child = cmd
            .args([
                "--heartbeat-interval",
                "200ms",
                "--heartbeat-timeout",
                "2s",
                "--initial-reconnect-delay",
                "50ms",
                "--max-reconnect-delay",
                "500ms",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tether worker");
        Self { child }
    }

    /// The warden of its tasks' processes (a `tether-warden` shell, its child), in a list.
    fn wardens(&self) -> Vec<u32> {
        let me = self.child.id().to_string();
        std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let ppid = stat
                    .rfind(')')
                    .and_then(|i| stat[i + 1..].split_whitespace().nth(1));
                ppid == Some(me.as_str())
                    && cmdline
                        .split(|b| *b == 0)
                        .any(|arg| arg == b"tether-warden")
            })
            .collect()
    }

    /// SIGKILL, and reap it.
    fn kill(mut self) {
        self.child.kill().expect("kill worker");
        self.child.wait().expect("reap worker");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A coordinator whose grace period is long enough that only the worker's inventory (never the
/// sweeper) can end a lease in these tests.
fn coordinator_config(dir: PathBuf) -> tether_coordinator::CoordinatorConfig {
    let mut c = fast_coordinator_config(dir);
    c.lost_after = Duration::from_secs(120);
    c
}

fn counted(results: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    results.iter().filter(|r| r["stale"] == false).collect()
}

/// Results waiting in the worker's journal, read from the side (WAL allows a reader).
fn journaled_results(state_dir: &Path) -> Option<i64> {
    let conn = rusqlite::Connection::open_with_flags(
        state_dir.join("worker.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .ok()?;
    conn.query_row("SELECT count(*) FROM outbox WHERE class = 0", [], |r| {
        r.get(0)
    })
    .ok()
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_reports_its_running_task_lost_on_restart_and_it_resumes_from_its_checkpoint()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("worker-state");
    let log = dir.path().join("worker.log");
    let c = spawn_coordinator_with(coordinator_config(dir.path().join("coord")), None).await;
    let client = c.client();
    let worker = WorkerProcess::start(c.addr, &state_dir, &log);
    // 50 steps of 200 ms, a checkpoint every 5 steps; and a short one.
    let ids = client
        .submit(&[sleep_task(10_000, 50, 5), sleep_task(300, 3, 0)])
        .await;
    let (long, short) = (&ids[0], &ids[1]);
    wait_for(
        "the short task to complete and the long one to checkpoint",
        LONG,
        || async {
            let done = client.task(short).await["status"] == "completed";
            let cp = !client.task(long).await["latest_checkpoint"].is_null();
            (done && cp).then_some(())
        },
    )
    .await;
    assert_eq!(client.task(long).await["attempt"], 1);
    worker.kill();

    let worker = WorkerProcess::start(c.addr, &state_dir, &log);
    let t = wait_for("the long task to complete", LONG, || async {
        let t = client.task(long).await;
        (t["status"] == "completed").then_some(t)
    })
    .await;
    let log_text = log_of(&log);
    assert!(
        log_text.contains("reporting it lost"),
        "the restarted worker found the task it lost: {log_text}"
    );
    assert_eq!(t["attempt"], 2, "{t}");
    assert_eq!(t["attempts"][0]["worker"], "w1");
    assert_eq!(
        t["attempts"][0]["end"], "lost",
        "the registration's inventory ended attempt 1: {t}"
    );
    let o = client.overview().await;
    assert_eq!(
        o["counters"]["workers_lost"], 0,
        "the sweeper did not do it: {o}"
    );
    let results = client.results(long).await;
    let long_counted = counted(&results);
    assert_eq!(long_counted.len(), 1, "{results:?}");
    assert_eq!(long_counted[0]["attempt"], 2);
    let resumed_at = long_counted[0]["body"]["result"]["resumed_at"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        resumed_at >= 5,
        "resumed from a checkpoint, at step {resumed_at}"
    );
    let short_results = client.results(short).await;
    assert_eq!(counted(&short_results).len(), 1, "{short_results:?}");
    worker.kill();
    c.stop().await;
}

/// Without a state directory the restarted process cannot say what died with the old one;
/// the coordinator tells them apart by their boot ids. The lease of the process that is gone
/// ends lost and the task runs again as attempt 2 from its checkpoint: the history shows the
/// restart (before, the new process was handed attempt 1 again, as if nothing had happened).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restarted_without_a_state_dir_runs_its_lost_task_as_a_new_attempt_from_its_checkpoint()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("worker.log");
    let c = spawn_coordinator_with(coordinator_config(dir.path().join("coord")), None).await;
    let client = c.client();
    let worker = WorkerProcess::start_with(c.addr, None, &log);
    let id = client.submit(&[sleep_task(10_000, 50, 5)]).await.remove(0);
    wait_for("the task to checkpoint", LONG, || async {
        (!client.task(&id).await["latest_checkpoint"].is_null()).then_some(())
    })
    .await;
    worker.kill();
    let worker = WorkerProcess::start_with(c.addr, None, &log);
    let t = wait_for("the task to complete", LONG, || async {
        let t = client.task(&id).await;
        (t["status"] == "completed").then_some(t)
    })
    .await;
    assert_eq!(t["attempt"], 2, "{t}");
    assert_eq!(t["attempts"][0]["end"], "lost", "{t}");
    let o = client.overview().await;
    assert_eq!(o["counters"]["workers_lost"], 0, "not the sweeper: {o}");
    let results = client.results(&id).await;
    let counted = counted(&results);
    assert_eq!(counted.len(), 1, "{results:?}");
    assert_eq!(counted[0]["attempt"], 2);
    let resumed_at = counted[0]["body"]["result"]["resumed_at"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        resumed_at >= 5,
        "resumed from a checkpoint, at step {resumed_at}"
    );
    worker.kill();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_finished_while_the_coordinator_was_down_survives_a_worker_kill_and_is_recorded_once()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("worker-state");
    let coord_dir = dir.path().join("coord");
    let log = dir.path().join("worker.log");
    let c = spawn_coordinator_with(coordinator_config(coord_dir.clone()), None).await;
    let addr = c.addr;
    let client = c.client();
    let worker = WorkerProcess::start(addr, &state_dir, &log);
    let ids = client.submit(&[sleep_task(1_500, 15, 0)]).await;
    let id = &ids[0];
    client.wait_status(id, "running").await;
    c.stop().await;
    // The task finishes while the coordinator is down; its result is journaled.
    wait_for("the result to be journaled", LONG, || async {
        (journaled_results(&state_dir) == Some(1)).then_some(())
    })
    .await;
    worker.kill();

    let c = spawn_coordinator_with(coordinator_config(coord_dir), Some(addr)).await;
    let client = c.client();
    let worker = WorkerProcess::start(addr, &state_dir, &log);
    let t = wait_for("the journaled result to be recorded", LONG, || async {
        let t = client.task(id).await;
        (t["status"] == "completed").then_some(t)
    })
    .await;
    assert_eq!(t["attempt"], 1, "not run again: {t}");
    let results = client.results(id).await;
    assert_eq!(results.len(), 1, "recorded exactly once: {results:?}");
    assert_eq!(counted(&results).len(), 1);
    let log_text = log_of(&log);
    assert_eq!(
        log_text.matches("task finished").count(),
        1,
        "the result came from the journal, not from a second run: {log_text}"
    );
    wait_for(
        "the acknowledged result to leave the journal",
        LONG,
        || async { (journaled_results(&state_dir) == Some(0)).then_some(()) },
    )
    .await;
    worker.kill();
    c.stop().await;
}

/// Whether a process runs (a zombie does not count: nothing here reaps orphans).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s[s.rfind(')')? + 1..].to_owned();
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_left_running_by_a_killed_worker_is_killed_when_the_worker_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("worker-state");
    let log = dir.path().join("worker.log");
    let c = spawn_coordinator_with(coordinator_config(dir.path().join("coord")), None).await;
    let client = c.client();
    let worker = WorkerProcess::start(c.addr, &state_dir, &log);
    // The group's leader, and a process that left the group (a session of its own).
    let pids = dir.path().join("pids");
    std::fs::create_dir_all(&pids).expect("mkdir");
    let script = r#"setsid sh -c 'echo $$ > "$D/pid.tmp"; mv "$D/pid.tmp" "$D/escaped"; exec sleep 300' >/dev/null 2>&1 &
        exec sleep 300"#;
    let ids = client
        .submit(&[tether_proto::TaskSpec::new(
            "command",
            serde_json::json!({"shell": script, "env": {"D": pids}}),
        )])
        .await;
    let id = &ids[0];
    client.wait_status(id, "running").await;
    let record = state_dir.join("groups").join(id.to_string());
    let pgid: u32 = wait_for("the process group to be recorded", LONG, || async {
        std::fs::read_to_string(&record)
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
    .await;
    let escaped: u32 = wait_for("the escaped process to start", LONG, || async {
        std::fs::read_to_string(pids.join("escaped"))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
    .await;
    // The warden would end them as soon as the worker dies: killed first (as the OOM killer or
    // a kill of the whole tree would), the records are what is left.
    let wardens = wait_for("the worker's warden to start", LONG, || async {
        Some(worker.wardens()).filter(|w| w.len() == 1)
    })
    .await;
    for warden in wardens {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(warden).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the warden");
    }
    worker.kill();
    assert!(
        alive(pgid) && alive(escaped),
        "SIGKILL of the worker and its warden leaves its command running"
    );

    let worker = WorkerProcess::start(c.addr, &state_dir, &log);
    wait_for("the orphaned command to be killed", LONG, || async {
        (!alive(pgid) && !alive(escaped)).then_some(())
    })
    .await;
    let log_text = log_of(&log);
    assert!(
        log_text.contains("outlived the previous worker process"),
        "{log_text}"
    );
    // The task was reported lost and runs again as attempt 2; its cancel ends the process it
    // set out of its group too (before the worker is killed, which would leave it running).
    wait_for("attempt 2 to run", LONG, || async {
        let t = client.task(id).await;
        (t["attempt"] == 2 && t["status"] == "running").then_some(())
    })
    .await;
    let escaped_again: u32 = wait_for("attempt 2's escaped process", LONG, || async {
        let pid = std::fs::read_to_string(pids.join("escaped")).ok()?;
        pid.trim().parse().ok().filter(|pid| *pid != escaped)
    })
    .await;
    assert_eq!(client.control(id, "cancel").await.0, 200);
    client.wait_status(id, "cancelled").await;
    wait_for("the cancel to end the escaped process", LONG, || async {
        (!alive(escaped_again)).then_some(())
    })
    .await;
    worker.kill();
    c.stop().await;
}

/// Without a state directory there is no record a next worker would read from the same place,
/// and no next worker may come: the worker's warden ends the attempt's group, and the process
/// that left it, as soon as the worker is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_left_running_by_a_killed_worker_is_killed_by_its_warden_with_no_worker_started_again()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("worker.log");
    let c = spawn_coordinator_with(coordinator_config(dir.path().join("coord")), None).await;
    let client = c.client();
    let worker = WorkerProcess::start_with(c.addr, None, &log);
    let pids = dir.path().join("pids");
    std::fs::create_dir_all(&pids).expect("mkdir");
    // Deaf to SIGTERM, both: only the SIGKILL after the grace ends them.
    let script = r#"trap '' TERM
        setsid sh -c 'trap "" TERM; echo $$ > "$D/e.tmp"; mv "$D/e.tmp" "$D/escaped"; while :; do sleep 1; done' >/dev/null 2>&1 &
        echo $$ > "$D/l.tmp"; mv "$D/l.tmp" "$D/leader"
        while :; do sleep 1; done"#;
    let id = client
        .submit(&[tether_proto::TaskSpec::new(
            "command",
            serde_json::json!({"shell": script, "env": {"D": pids}}),
        )])
        .await
        .remove(0);
    client.wait_status(&id, "running").await;
    let read_pid = |name: &'static str| {
        let file = pids.join(name);
        async move {
            std::fs::read_to_string(&file)
                .ok()?
                .trim()
                .parse::<u32>()
                .ok()
        }
    };
    let leader = wait_for("the leader to start", LONG, || read_pid("leader")).await;
    let escaped = wait_for("the escaped process to start", LONG, || read_pid("escaped")).await;
    wait_for("the worker's warden to start", LONG, || async {
        (worker.wardens().len() == 1).then_some(())
    })
    .await;
    worker.kill();
    wait_for("the warden to kill the command", LONG, || async {
        (!alive(leader) && !alive(escaped)).then_some(())
    })
    .await;
    c.stop().await;
}

/// SIGTERM to the worker process.
fn terminate(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
}

/// A second stop signal ends a stopping worker at once (exit 130) and kills its task's
/// processes, which a process that simply exited would leave running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_ends_the_worker_at_once_and_kills_its_task_s_processes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("worker-state");
    let log = dir.path().join("worker.log");
    let c = spawn_coordinator_with(coordinator_config(dir.path().join("coord")), None).await;
    let client = c.client();
    let mut worker = WorkerProcess::start(c.addr, &state_dir, &log);
    let pids = dir.path().join("pids");
    std::fs::create_dir_all(&pids).expect("mkdir");
    // Deaf to SIGTERM: a graceful stop waits the command's kill grace for it.
    let script =
        r#"trap '' TERM; echo $$ > "$D/pid.tmp"; mv "$D/pid.tmp" "$D/task"; exec sleep 300"#;
    let id = client
        .submit(&[tether_proto::TaskSpec::new(
            "command",
            serde_json::json!({"shell": script, "env": {"D": pids}}),
        )])
        .await
        .remove(0);
    client.wait_status(&id, "running").await;
    let task: u32 = wait_for("the task's process to start", LONG, || async {
        std::fs::read_to_string(pids.join("task"))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
    .await;
    terminate(&worker.child);
    wait_for("the worker to start stopping", LONG, || async {
        let (_, w) = client.get("/api/v1/workers/w1").await;
        (w["stopping"] == true).then_some(())
    })
    .await;
    terminate(&worker.child);
    let end = std::time::Instant::now() + LONG;
    let status = loop {
        if let Some(status) = worker.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(std::time::Instant::now() < end, "the worker did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(130), "{}", log_of(&log));
    assert!(
        !alive(task),
        "the task's process is killed, not left behind"
    );
    let log_text = log_of(&log);
    assert!(log_text.contains("a second stop signal"), "{log_text}");
    c.stop().await;
}
