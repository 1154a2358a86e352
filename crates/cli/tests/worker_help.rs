//! What `tether worker --help` says of its settings is what the worker does.

use std::process::{Command, Stdio};

/// `--heartbeat-timeout` is raised by the measured round-trip time of the heartbeats as well
/// as by a coordinator that stretches the heartbeat interval (`crates/worker/src/adaptive.rs`);
/// the help said it was raised only by the second.
#[test]
fn heartbeat_timeout_help_says_it_follows_the_round_trip_time() {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["worker", "--help"])
        .env_remove("TETHER_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run tether");
    assert_eq!(out.status.code(), Some(0));
    // The help as words, whatever its wrapping.
    let help = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let at = help
        .find("--heartbeat-timeout")
        .expect("--heartbeat-timeout");
    let said = &help[at..];
    let said = &said[..said
        .find(" --initial-reconnect-delay")
        .unwrap_or(said.len())];
    assert!(!said.contains("raised only"), "{said}");
    assert!(
        said.contains("plus 4 x the p95 round-trip time of its heartbeats (at most 60s"),
        "{said}"
    );
    assert!(said.contains("stretches the heartbeat interval"), "{said}");
}
