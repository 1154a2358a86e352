//! The coordinator's secrets directory going wrong: what its workers do about it.

use std::time::Duration;

use tether_coordinator::auth::WorkerAuth;
use tether_proto::auth::Secret;
use tether_testkit::*;
use tether_worker::{ConnState, Executors};

use crate::raw::counter;
use crate::support::coordinator_with;

const SECRET: &str = "the worker's own secret";

/// A secrets directory the coordinator cannot read (here a file where the directory should
/// be: ENOTDIR; in life too many open files in a reconnect storm, an I/O error, a stale
/// mount) is the coordinator's trouble: its workers are told to try again, not refused, so
/// they keep trying past the refusals that would stop them for good, and register once the
/// directory is repaired.
#[tokio::test]
async fn a_worker_keeps_trying_while_the_coordinator_cannot_read_its_secret_and_registers_after() {
    let secrets = tempfile::tempdir().expect("secrets");
    let broken = secrets.path().join("secrets");
    std::fs::write(&broken, "a file where the directory should be").expect("write");
    let (_dir, c) = coordinator_with(|cfg| {
        cfg.auth = Some(WorkerAuth {
            fleet: None,
            dir: Some(broken.clone()),
            max_skew: Duration::from_secs(30),
            message_mac: false,
        });
    })
    .await;
    let mut wcfg = fast_worker_config(&c.ws_url(), "w-unread");
    wcfg.secret = Some(Secret::new(SECRET.as_bytes()).expect("secret"));
    let attempts_past_stop = wcfg.refusals_before_stop as usize + 2;
    let w = spawn_worker(wcfg, Executors::builtin());
    wait_for(
        "attempts past the refusals that stop a worker",
        DEADLINE,
        || {
            let done = w.handle.shared.recent_attempts().len() >= attempts_past_stop
                || w.join.is_finished();
            async move { done.then_some(()) }
        },
    )
    .await;
    assert!(
        !w.join.is_finished(),
        "the worker stopped: {:?}",
        w.handle.shared.refusal.lock().expect("refusal")
    );
    assert_eq!(w.handle.registrations(), 0);
    let o = c.client().overview().await;
    assert_eq!(counter(&o, "auth_failures"), 0, "{o}");
    // Repaired, the directory serves the worker's secret, and the worker registers.
    std::fs::remove_file(&broken).expect("remove");
    std::fs::create_dir(&broken).expect("mkdir");
    std::fs::write(broken.join("w-unread"), format!("{SECRET}\n")).expect("write");
    w.wait_state(|s| s == ConnState::Connected).await;
    assert_eq!(w.handle.registrations(), 1);
    w.stop().await.expect("clean stop");
    c.stop().await;
}
