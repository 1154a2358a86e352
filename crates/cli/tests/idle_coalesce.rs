//! `tether coordinator --idle-coalesce`: applied when given within its limit, refused with the
//! limit named past it (the stress report only echoes what it passed; this checks the
//! coordinator itself).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn coordinator(dir: &std::path::Path, wait: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tether"));
    c.args([
        "--log",
        "info",
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(dir)
    .args(["--idle-coalesce", wait])
    .env_remove("TETHER_CONFIG")
    .env_remove("TETHER_IDLE_COALESCE")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    c
}

#[tokio::test]
async fn the_coordinator_applies_idle_coalescing_within_its_limit_and_refuses_it_past() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = coordinator(dir.path(), "2ms").spawn().expect("start");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let applied = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("idle coalescing on") {
                return Some(line);
            }
        }
        None
    })
    .await
    .expect("the coordinator logs within 30 s")
    .expect("the coordinator says idle coalescing is on");
    assert!(
        applied.contains("wait_us") && applied.contains("2000"),
        "{applied}"
    );
    let _ = child.kill().await;

    let refused = coordinator(dir.path(), "25ms").output().await.expect("run");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("25 ms") && err.contains("20 ms"), "{err}");
}
