//! A real `tether worker --metrics-listen` process serves its Prometheus metrics.

use std::process::{Child, Command, Stdio};

use tether_testkit::*;
use tether_worker::metrics as wm;

/// Kills the child when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_worker_process_serves_its_metrics_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = spawn_coordinator(dir.path().to_owned()).await;
    // A free port for the worker's metrics (released just before the worker binds it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let _worker = Killed(
        Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["--log", "warn", "worker", "--coordinator"])
            .arg(c.ws_url())
            .args([
                "--id",
                "mw1",
                "--heartbeat-interval",
                "200ms",
                "--heartbeat-timeout",
                "2s",
            ])
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tether worker"),
    );
    let client = c.client();
    let ids = client.submit(&[sleep_task(50, 1, 0)]).await;
    client.wait_status(&ids[0], "completed").await;
    let url = format!("http://127.0.0.1:{port}/metrics");
    let text = wait_for("the worker's metrics to show RTT", DEADLINE, || async {
        let r = reqwest::get(&url).await.ok()?;
        let text = r.text().await.ok()?;
        let rtt = metric_value(&text, &format!("{}_count", wm::HEARTBEAT_RTT), &[])?;
        (rtt > 0.0).then_some(text)
    })
    .await;
    let value = |name: &str, labels: &[(&str, &str)]| {
        metric_value(&text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} in:\n{text}"))
    };
    assert_eq!(value(wm::CONNECTION_STATE, &[("state", "connected")]), 1.0);
    assert_eq!(
        value(wm::CONNECTION_STATE, &[("state", "disconnected")]),
        0.0
    );
    assert_eq!(value(wm::CONNECTION_ATTEMPTS, &[]), 1.0);
    assert_eq!(value(wm::TASKS_FINISHED, &[("outcome", "completed")]), 1.0);
    assert_eq!(
        value(
            &format!("{}_count", wm::TASK_DURATION),
            &[("outcome", "completed")]
        ),
        1.0
    );
    assert!(value(wm::MESSAGES_OUT, &[("type", "heartbeat")]) > 0.0);
    assert!(value(wm::MESSAGES_IN, &[("type", "task_assignment")]) >= 1.0);
    assert!(value(wm::OUTBOX_DEPTH, &[]) >= 0.0);
    assert_eq!(value(wm::TASKS, &[("state", "running")]), 0.0);
    assert!(value(wm::STABILITY, &[]) > 0.0);
    for line in text.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|l| l.split(' ').next())
        {
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has help");
        }
    }
    c.stop().await;
}
