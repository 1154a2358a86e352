//! The process's scratch directory (`$TMPDIR/tether-worker-<pid>`, the tasks' checkpoint
//! directories of agents without a state directory): shared by the process's agents, kept while
//! one of them remains, removed with the last one (a clean exit left it behind, lock file and
//! all, for the next worker's sweep).
//!
//! Every other test of this binary shares its process's scratch directory, so the checks run in
//! a process of their own: this binary again, running this test alone, with a temporary
//! directory of its own.

use std::process::Command;

use tether_proto::WorkerId;
use tether_worker::{Agent, Executors, WorkerConfig};

/// Set in the child process that makes the agents.
const CHILD: &str = "TETHER_IT_SCRATCH_CHILD";

/// This test's full name, for the child's filter.
const NAME: &str =
    "scratch::the_scratch_directory_is_kept_while_an_agent_uses_it_and_goes_with_the_last";

#[test]
fn the_scratch_directory_is_kept_while_an_agent_uses_it_and_goes_with_the_last() {
    if std::env::var_os(CHILD).is_some() {
        agents_keep_and_remove_the_scratch_directory();
        return;
    }
    let temp = tempfile::tempdir().expect("tempdir");
    let out = Command::new(std::env::current_exe().expect("this test binary"))
        .args([NAME, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD, "1")
        .env("TMPDIR", temp.path())
        .output()
        .expect("run the child");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{}: {text}", out.status);
    // It ran, not filtered away.
    assert!(text.contains("1 passed"), "{text}");
    assert_eq!(scratch_entries(temp.path()), Vec::<String>::new(), "{text}");
}

/// In the child: two agents share the directory; it stays while either remains, goes with the
/// second, and the next agent makes it again (and takes it with it).
fn agents_keep_and_remove_the_scratch_directory() {
    let temp = std::env::temp_dir();
    let root = temp.join(format!("tether-worker-{}", std::process::id()));
    let agent = |id: &str| {
        let cfg = WorkerConfig::new("ws://127.0.0.1:1", WorkerId::parse(id).expect("id"));
        Agent::new(cfg, Executors::builtin()).expect("agent")
    };
    let first = agent("first");
    assert!(
        root.join("lock").is_file(),
        "made and locked by the first agent"
    );
    let second = agent("second");
    drop(first);
    assert!(root.join("lock").is_file(), "kept while an agent uses it");
    drop(second);
    assert!(!root.exists(), "left behind by the last agent");
    let third = agent("third");
    assert!(root.is_dir(), "made again by the next agent");
    drop(third);
    assert_eq!(scratch_entries(&temp), Vec::<String>::new());
}

/// The entries of `temp` named like a worker's scratch directory (being made, or removed, too).
fn scratch_entries(temp: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(temp)
        .expect("read the temporary directory")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("tether-worker-"))
        .collect()
}
