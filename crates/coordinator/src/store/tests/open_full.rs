//! A start while the data directory is still out of space: the open, and the writer's first
//! journal file, wait for room instead of failing (`space::OpenWait`, `start_states`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;

/// Waits for `done` to hold, failing past `within`.
fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A data directory as a coordinator stopped while out of space leaves it: task states
/// committed and acknowledged, in the journal only (the writer returned without folding).
fn stopped_with_journaled_states(dir: &Path) {
    let mut j = Journaled::open(dir);
    j.commit(vec![new_task("a"), new_task("b"), state_mut("a", 1)]);
    j.commit(vec![state_mut("a", 2), state_mut("b", 7)]);
    assert_eq!(count(&j.conn, "task_state"), 0);
}

/// The task states in `task_state`, read by a connection of the test's own.
fn table_states(dir: &Path) -> i64 {
    let conn = Connection::open(dir.join(DB_FILE)).expect("a reader");
    count(&conn, "task_state")
}

/// A coordinator stopped while its disk was full left its state journal; restarted while the
/// disk is still full, its open could not replay it and the process exited (again at each
/// restart). The open waits, trying again, and once there is room it replays every state;
/// the tries that failed left nothing behind (the replay is one transaction), so nothing is
/// applied twice or lost.
#[test]
fn an_open_out_of_space_waits_for_room_then_replays_every_journaled_state() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    stopped_with_journaled_states(&dir);
    let journaled = journal(&dir);
    assert_eq!(journaled.0, 1);
    space::full::fill(&dir);
    let opening = {
        let dir = dir.clone();
        std::thread::spawn(move || open(&dir))
    };
    until("three failed replays", Duration::from_secs(20), || {
        space::full::failed(&dir) >= 3
    });
    assert!(
        !opening.is_finished(),
        "the open returned while out of space"
    );
    assert_eq!(table_states(&dir), 0, "a failed replay left rows behind");
    assert_eq!(
        journal(&dir),
        journaled,
        "the journal is kept until replayed"
    );
    space::full::free(&dir);
    let (conn, loaded) = opening.join().expect("the open").expect("opened");
    assert_eq!(state_n(&conn, "a"), Some(2));
    assert_eq!(state_n(&conn, "b"), Some(7));
    assert_eq!(count(&conn, "task_state"), 2);
    assert_eq!(loaded.tasks.len(), 2);
    assert_eq!(journal(&dir), (0, 0), "replayed, the journal goes");
}

/// A stop (SIGTERM) while the open waits for space ends the wait within a pause's slice, not
/// the next try's, and leaves the data directory as it was for the next start.
#[test]
fn a_stop_while_the_open_waits_for_space_returns_at_once_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    stopped_with_journaled_states(&dir);
    let journaled = journal(&dir);
    space::full::fill(&dir);
    let stop = CancellationToken::new();
    let opening = {
        let (dir, stop) = (dir.clone(), stop.clone());
        std::thread::spawn(move || open_until(&dir, &stop).map(|_| ()))
    };
    // Past the pauses of 100, 200 and 400 ms: the next is 800.
    until("three failed replays", Duration::from_secs(20), || {
        space::full::failed(&dir) >= 3
    });
    let stopped = Instant::now();
    stop.cancel();
    until("the open to return", Duration::from_secs(20), || {
        opening.is_finished()
    });
    assert!(
        stopped.elapsed() < Duration::from_millis(500),
        "the stop waited for the pause: {:?}",
        stopped.elapsed()
    );
    let e = opening.join().expect("the open").expect_err("stopped");
    assert!(matches!(e, StoreError::OutOfSpace { .. }), "{e}");
    assert!(e.to_string().contains("out of space"), "{e}");
    assert_eq!(journal(&dir), journaled);
    assert_eq!(table_states(&dir), 0);
    space::full::free(&dir);
    let (conn, _) = open(&dir).expect("the next start");
    assert_eq!(state_n(&conn, "a"), Some(2));
    assert_eq!(state_n(&conn, "b"), Some(7));
}

/// A store opened in `dir`, the directory then made full, and its writer started with
/// `tokens` (failure, stop): the writer's queue, its statistics and its thread.
fn writer_on_a_full_disk(
    dir: &std::path::Path,
    tokens: (CancellationToken, CancellationToken),
) -> (
    tokio::sync::mpsc::Sender<Batch>,
    Arc<StoreStats>,
    std::thread::JoinHandle<()>,
) {
    let (conn, loaded) = open(dir).expect("open");
    space::full::fill(dir);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let stats = Arc::new(StoreStats::default());
    let thread = spawn_writer(
        conn,
        dir.join(DB_FILE),
        rx,
        stats.clone(),
        tokens,
        WriterOptions::default(),
        loaded.unfolded,
    )
    .expect("the writer starts, to wait for room");
    (tx, stats, thread)
}

/// The writer makes its journal's first file before it takes a group; with no room for it,
/// starting the writer used to fail and the coordinator with it. The writer waits instead, as
/// a commit does: the store says it is out of space, nothing is committed or acknowledged,
/// and once there is room what waited commits.
#[test]
fn a_writer_with_no_room_for_its_journal_waits_then_commits_what_waited() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let (tx, stats, thread) = writer_on_a_full_disk(&dir, Default::default());
    let (done, committed) = std::sync::mpsc::channel();
    let mut b = Batch::default();
    b.muts.push(new_task("a"));
    b.muts.push(state_mut("a", 1));
    b.effect(move |conn| {
        let _ = done.send(count(conn, "tasks"));
    });
    tx.blocking_send(b).expect("send");
    until("the store out of space", Duration::from_secs(20), || {
        stats.out_of_space.load(Ordering::Acquire)
    });
    until("three failed tries", Duration::from_secs(20), || {
        space::full::failed(&dir) >= 3
    });
    assert!(
        committed.try_recv().is_err(),
        "committed while out of space"
    );
    assert_eq!(stats.commits.load(Ordering::Relaxed), 0);
    space::full::free(&dir);
    let tasks = committed
        .recv_timeout(Duration::from_secs(20))
        .expect("committed once there is room");
    assert_eq!(tasks, 1);
    assert!(!stats.out_of_space.load(Ordering::Acquire));
    drop(tx);
    thread.join().expect("writer ends");
    // It stopped cleanly: its states folded, its journal gone.
    let (conn, _) = open(&dir).expect("reopen");
    assert_eq!(table_n(&conn, "a"), Some(1));
    assert_eq!(journal(&dir), (0, 0));
}

/// A stop while the writer waits to start its journal ends it, taking nothing.
#[test]
fn a_stop_while_the_writer_waits_to_start_its_journal_ends_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let (fatal, stopping) = (CancellationToken::new(), CancellationToken::new());
    let (tx, stats, thread) = writer_on_a_full_disk(&dir, (fatal.clone(), stopping.clone()));
    tx.blocking_send(Batch {
        muts: vec![new_task("a")],
        effects: vec![],
        reads: vec![],
    })
    .expect("send");
    until("the store out of space", Duration::from_secs(20), || {
        stats.out_of_space.load(Ordering::Acquire)
    });
    stopping.cancel();
    // The sender is kept (a core blocked handing the writer more): the stop alone ends it.
    until("the writer to end", Duration::from_secs(20), || {
        thread.is_finished()
    });
    thread.join().expect("writer ends");
    assert!(!fatal.is_cancelled(), "a stop is no failure");
    drop(tx);
    space::full::free(&dir);
    let (conn, loaded) = open(&dir).expect("reopen");
    assert!(loaded.tasks.is_empty(), "nothing was taken");
    assert_eq!(count(&conn, "tasks"), 0);
}
