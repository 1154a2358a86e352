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

/// A rotation of the fleet secret without a flag day: with a next secret beside it, workers on
/// either register (with integrity tags under the secret each proved), and one on neither is
/// refused; the next secret made the fleet secret (and the old one dropped) and read again,
/// workers on the old one are refused and those on the new one register.
#[tokio::test]
async fn workers_on_the_fleet_secret_or_the_next_one_register_during_a_rotation() {
    let files = tempfile::tempdir().expect("files");
    let (old, new) = (
        "the fleet secret before the rotation",
        "the fleet secret after the rotation",
    );
    let fleet_file = files.path().join("fleet.secret");
    let next_file = files.path().join("next.secret");
    std::fs::write(&fleet_file, old).expect("write");
    std::fs::write(&next_file, new).expect("write");
    let fleet = tether_coordinator::auth::Fleet::from_file(&fleet_file)
        .expect("fleet")
        .with_next_file(&next_file)
        .expect("next");
    let mut auth = WorkerAuth::fleet(Secret::new(old.as_bytes()).expect("secret"));
    auth.fleet = Some(fleet.clone());
    auth.message_mac = true;
    let (_dir, c) = coordinator_with(|cfg| cfg.auth = Some(auth)).await;
    let worker = |id: &str, secret: &str| {
        let mut w = fast_worker_config(&c.ws_url(), id);
        w.secret = Some(Secret::new(secret.as_bytes()).expect("secret"));
        w
    };
    let on_old = crate::support::connected(worker("w-old", old), Executors::builtin()).await;
    let on_new = crate::support::connected(worker("w-new", new), Executors::builtin()).await;
    // Work flows over both sessions (their tags are under the secret each proved).
    let client = c.client();
    let ids = client
        .submit(&[
            sleep_task(10, 1, 0),
            sleep_task(10, 1, 0),
            sleep_task(10, 1, 0),
        ])
        .await;
    for id in &ids {
        client.wait_status(id, "completed").await;
    }
    let refused = |n: u64| {
        let client = client.clone();
        async move {
            wait_for("a refusal", DEADLINE, || {
                let client = client.clone();
                async move { (counter(&client.overview().await, "auth_failures") >= n).then_some(()) }
            })
            .await
        }
    };
    let o = client.overview().await;
    assert_eq!(counter(&o, "auth_failures"), 0, "{o}");
    assert!(counter(&o, "mac_sessions") >= 2, "{o}");
    let stranger = spawn_worker(
        worker("w-neither", "neither the old nor the new secret"),
        Executors::builtin(),
    );
    refused(1).await;
    assert_eq!(stranger.handle.registrations(), 0);
    let _ = stranger.stop().await;
    on_old.stop().await.expect("clean stop");
    on_new.stop().await.expect("clean stop");

    // The rotation ends: the new secret is the fleet's, the next file holds it as well.
    std::fs::write(&fleet_file, new).expect("write");
    assert!(fleet.reload().expect("reloaded"));
    let before = counter(&client.overview().await, "auth_failures");
    let late = spawn_worker(worker("w-late", old), Executors::builtin());
    refused(before + 1).await;
    assert_eq!(late.handle.registrations(), 0);
    let _ = late.stop().await;
    let moved = crate::support::connected(worker("w-moved", new), Executors::builtin()).await;
    moved.stop().await.expect("clean stop");
    c.stop().await;
}
