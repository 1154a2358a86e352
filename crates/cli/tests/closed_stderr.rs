//! A long-running `tether` process whose log reader went away keeps working: a log line it
//! cannot write is dropped, not a panic (exit 101) that takes its tasks with it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tether_testkit::*;

/// How long a task or a stop may take before the test gives up on it.
const LONG: Duration = Duration::from_secs(60);

/// A worker started as `tether worker ... 2>&1 | head -3`, its log's reader gone before the
/// first line: every write of its log fails (EPIPE). It registers, runs a task to completion,
/// and stops cleanly on SIGTERM. Before the fix, the log's first failed write panicked in the
/// subscriber's own report of it (exit 101): the worker never registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_log_reader_went_away_runs_its_task_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().to_owned()).await;
    let mut worker = Killed(
        Command::new(env!("CARGO_BIN_EXE_tether"))
            // Debug: a line at every step, each one a failed write.
            .args(["--log", "debug", "worker", "--coordinator"])
            .arg(c.ws_url())
            .args(["--id", "deaf1"])
            .env_remove("TETHER_LOG")
            .env_remove("TETHER_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tether worker"),
    );
    drop(worker.0.stderr.take());
    let client = c.client();
    let ids = client.submit(&[sleep_task(50, 4, 2)]).await;
    client.wait_status(&ids[0], "completed").await;
    assert!(
        worker.0.try_wait().expect("try_wait").is_none(),
        "the worker exited"
    );
    let pid = nix::unistd::Pid::from_raw(i32::try_from(worker.0.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + LONG;
    let status = loop {
        if let Some(status) = worker.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the worker did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    c.stop().await;
}
