//! A real `tether worker` process given its secret in the environment keeps it from its tasks:
//! they run as its user, so neither their environment nor (unless that user is root, who reads
//! any process's) the worker's `/proc` files show it.

use std::process::{Child, Command, Stdio};

use tether_coordinator::auth::WorkerAuth;
use tether_proto::TaskSpec;
use tether_proto::auth::Secret;
use tether_testkit::*;

/// Kills the child when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const SECRET: &str = "a fleet secret no task may print";
const TOKEN: &str = "an operator token no task may print";

#[tokio::test]
async fn a_task_sees_neither_the_workers_secret_nor_its_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = fast_coordinator_config(dir.path().to_owned());
    cfg.auth = Some(WorkerAuth::fleet(
        Secret::new(SECRET.as_bytes()).expect("secret"),
    ));
    let c = spawn_coordinator_with(cfg, None).await;
    let _worker = Killed(
        Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["--log", "warn", "worker", "--coordinator"])
            .arg(c.ws_url())
            .args(["--id", "keeper"])
            .env("TETHER_SECRET", SECRET)
            .env("TETHER_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tether worker"),
    );
    // The task prints its environment and, unless it runs as root (who may read any process's
    // files: tasks of a root worker can read its secret), tries the worker's (its parent's).
    let root = nix::unistd::geteuid().is_root();
    if root {
        eprintln!("running as root: the worker's /proc files are not tried");
    }
    let shell = match root {
        true => "env; echo done",
        false => "env; tr '\\0' '\\n' < /proc/$PPID/environ; echo done",
    };
    let spec = TaskSpec::new("command", serde_json::json!({ "shell": shell }));
    let client = c.client();
    let id = client.submit(&[spec]).await.remove(0);
    client.wait_status(&id, "completed").await;
    let results = client.results(&id).await;
    let out = results[0].to_string();
    assert!(
        out.contains("TETHER_TASK_ID"),
        "the task's environment is there: {out}"
    );
    assert!(out.contains("done"), "{out}");
    for kept in [SECRET, TOKEN] {
        assert!(!out.contains(kept), "{kept:?} reached the task: {out}");
    }
    c.stop().await;
}
