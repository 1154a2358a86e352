//! The coordinator process's own settings. `tether coordinator --idle-coalesce`: applied when
//! given within its limit, refused with the limit named past it (the stress report only echoes
//! what it passed; this checks the coordinator itself). Transparent huge pages: off, in the
//! coordinator and in a fault proxy, which runs on the threads `--threads` asks (one by default).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn coordinator(dir: &std::path::Path, wait: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tether"));
    // Debug for the binary's own line on huge pages (`THP_OFF`).
    c.args([
        "--log",
        "info,tether=debug",
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

/// The coordinator runs without transparent huge pages (their zeroing stalled its runtime
/// threads for tens of milliseconds under a flood: docs/PERFORMANCE.md, thirty-first round),
/// as the kernel says of the running process.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_coordinator_process_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = coordinator(dir.path(), "2ms").spawn().expect("start");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    // Up: it logged its settings (after what it did about huge pages).
    let mut said = false;
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            said |= line.contains(THP_OFF);
            if line.contains("idle coalescing on") {
                return;
            }
        }
    })
    .await
    .expect("the coordinator logs within 30 s");
    assert_no_huge_pages(&mut child, said).await;
}

/// A fault proxy runs without transparent huge pages too: with them, the kernel zeroing fresh
/// 2 MiB pages took 5.8 % of the proxies' CPU in a thundering herd through them, and the
/// proxies used 19-34 % more CPU (docs/PERFORMANCE.md, thirty-second round). It runs on one
/// thread unless `--threads` asks for more.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_fault_proxy_runs_on_the_threads_asked_without_transparent_huge_pages() {
    for (threads, expected) in [(None, 1), (Some("3"), 4)] {
        let mut proxy = Command::new(env!("CARGO_BIN_EXE_tether"));
        proxy
            .args([
                "--log",
                "info,tether=debug",
                "proxy",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--upstream", "127.0.0.1:9", "--control", "127.0.0.1:0"])
            .arg("--json")
            .env_remove("TETHER_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(n) = threads {
            proxy.args(["--threads", n]);
        }
        let mut child = proxy.spawn().expect("start");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        // Up: it printed where it listens.
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the proxy prints within 30 s")
            .expect("read");
        assert!(line.is_some_and(|l| l.contains("listen")), "no listen line");
        // Its first log line, written before the runtime started.
        let mut log = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), log.next_line())
            .await
            .expect("the proxy logs within 30 s")
            .expect("read");
        let said = first.is_some_and(|l| l.contains(THP_OFF));
        let pid = child.id().expect("pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let running: Option<usize> = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse().ok());
        // The main thread, and the runtime's workers when there are several.
        assert_eq!(running, Some(expected), "--threads {threads:?}: {status}");
        assert_no_huge_pages(&mut child, said).await;
    }
}

/// What the process logs, at debug, once the kernel confirmed its huge pages off.
#[cfg(target_os = "linux")]
const THP_OFF: &str = "transparent huge pages off for this process";

/// What the kernel says of `child`'s transparent huge pages must be off, and the process must
/// have logged that the kernel confirmed it (`said`), which is the only check on kernels before
/// 6.0 (they do not say in `/proc/<pid>/status`); then `child` goes.
#[cfg(target_os = "linux")]
async fn assert_no_huge_pages(child: &mut tokio::process::Child, said: bool) {
    let pid = child.id().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let _ = child.kill().await;
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    if let Some(thp) = thp {
        assert_eq!(thp, "0", "{status}");
    }
    // Where the kernel does not say, this is the check: what the process read back from it.
    assert!(said, "the process did not log that huge pages are off");
}
