//! A real `tether worker` process given its secret in the environment keeps it from its tasks:
//! they run as its user, so neither their environment nor the worker's `/proc` files show it
//! (the worker makes itself undumpable). Root reads any process's files, so a test run as root
//! (as CI is) starts the worker as `nobody`, whose tasks are then refused the worker's files.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use tether_coordinator::auth::WorkerAuth;
use tether_proto::TaskSpec;
use tether_proto::auth::Secret;
use tether_testkit::*;

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
    let mut worker = Command::new(env!("CARGO_BIN_EXE_tether"));
    worker
        .args(["--log", "warn", "worker", "--coordinator"])
        .arg(c.ws_url())
        .args(["--id", "keeper"])
        .env("TETHER_SECRET", SECRET)
        .env("TETHER_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Root may read any process's files (tasks of a root worker can read its secret): as
    // root, the worker runs as nobody, in a directory of its own.
    let home = tempfile::tempdir().expect("tempdir");
    if nix::unistd::geteuid().is_root() {
        let nobody = nix::unistd::Uid::from_raw(65534);
        let nogroup = nix::unistd::Gid::from_raw(65534);
        nix::unistd::chown(home.path(), Some(nobody), Some(nogroup)).expect("chown");
        worker
            .current_dir(home.path())
            .uid(nobody.as_raw())
            .gid(nogroup.as_raw());
    }
    let _worker = Killed(worker.spawn().expect("start tether worker"));
    // The task prints its environment, then tries the worker's (its parent's), saying whether
    // it could: a read that silently failed would look like a secret kept.
    let shell =
        "env; if tr '\\0' '\\n' < /proc/$PPID/environ; then echo READ; else echo DENIED; fi";
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
    assert!(
        out.contains("DENIED"),
        "the worker's /proc files were read: {out}"
    );
    for kept in [SECRET, TOKEN] {
        assert!(!out.contains(kept), "{kept:?} reached the task: {out}");
    }
    c.stop().await;
}
