//! Checkpoints of the write-ahead log, off the writer's thread.

use std::cell::Cell;
use std::ffi::c_int;
use std::path::Path;

use rusqlite::Connection;

/// How often the checkpointer copies the WAL into the database...
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// ...and how often once the WAL is long, so that the writer soon finds a pass just finished
/// and has little left to copy itself.
pub const CATCH_UP_EVERY: std::time::Duration = std::time::Duration::from_millis(5);
/// How often a checkpoint pass that keeps failing is said again.
const WARN_AGAIN: std::time::Duration = std::time::Duration::from_secs(60);
/// Frames in the WAL past which the writer finishes a checkpoint itself, right after a pass of
/// the checkpointer, so that the WAL starts over (65,536 frames of 4 KiB pages: 256 MiB; twice
/// that, it does not wait for a pass). Each start-over holds the commits up for 3-15 ms on the
/// development machine, however long the WAL: at 16 MiB that was every 0.3 s under a flood of
/// 100,000 messages/s, at 256 MiB every 1-5 s.
pub const WAL_RESTART_FRAMES: u64 = 65_536;

thread_local! {
    /// Frames in the WAL after the last commit of this thread's connection (the writer's).
    static WAL_FRAMES: Cell<u64> = const { Cell::new(0) };
}

/// Makes `conn` record the WAL's length after each of its commits (SQLite's WAL hook, which
/// also turns its automatic checkpoint off), for [`wal_frames`] on the same thread.
pub(super) fn track_wal(conn: &Connection) {
    fn note(_: &rusqlite::hooks::Wal, frames: c_int) -> rusqlite::Result<()> {
        WAL_FRAMES.set(u64::try_from(frames).unwrap_or(0));
        Ok(())
    }
    conn.wal_hook(Some(note));
}

/// Frames in the WAL after this thread's last commit.
pub(super) fn wal_frames() -> u64 {
    WAL_FRAMES.get()
}

/// Copies what is left of the WAL into the database, between two commits of the writer.
/// Under steady commits the checkpointer never finds the WAL copied whole, and only a WAL
/// copied whole is started over; once this copies it all, the next commit starts it over.
/// When the checkpointer was copying at the same moment it copies less; the WAL then still
/// counts as long, and the writer tries again after its next group.
pub(super) fn finish_checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    let (log, copied) = passive(conn)?;
    if log == copied {
        WAL_FRAMES.set(0);
    }
    Ok(())
}

/// Copies the WAL into the database every [`CHECKPOINT_EVERY`], from a connection and thread
/// of its own. SQLite's automatic checkpoint runs inside the commit that crosses its threshold:
/// with it, commits of a single mutation took 4-7 ms now and then under the flood; without it,
/// 99.7 % of commits take under 0.5 ms. Stops when dropped.
///
/// Only a WAL copied whole starts over, which under steady commits takes a pass on the
/// writer's thread, between two commits ([`finish_checkpoint`]). That pass copies what the
/// checkpointer has not, and syncs the WAL and the database: up to 100 ms of commits when the
/// checkpointer last passed 100 ms before. So once the WAL is long the checkpointer passes every
/// [`CATCH_UP_EVERY`] and says when it has just passed ([`Checkpointer::just_passed`]).
pub(super) struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    passed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Checkpointer {
    /// `long`: frames past which the WAL counts as long (the writer's start-over threshold).
    pub fn start(path: &Path, long: u64) -> std::io::Result<Self> {
        let conn = Connection::open(path)
            .and_then(|c| c.execute_batch("PRAGMA busy_timeout = 5000;").map(|()| c))
            .map_err(std::io::Error::other)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let path = path.to_owned();
        let passed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let says = passed.clone();
        let thread = std::thread::Builder::new()
            .name("tether-checkpoint".into())
            .spawn(move || {
                let mut every = CHECKPOINT_EVERY;
                // A pass fails ten times a second while the disk is full: said once a minute.
                let mut failed: Option<(std::time::Instant, u64)> = None;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    match passive(&conn) {
                        Ok((log, _)) => {
                            let is_long = u64::try_from(log).unwrap_or(0) >= long;
                            every = if is_long { CATCH_UP_EVERY } else { CHECKPOINT_EVERY };
                            says.store(is_long, std::sync::atomic::Ordering::Release);
                            if let Some((_, n)) = failed.take() {
                                tracing::info!(db = %path.display(), failed = n, "WAL checkpoints pass again");
                            }
                        }
                        Err(e) => {
                            every = CHECKPOINT_EVERY;
                            match &mut failed {
                                Some((said, n)) if said.elapsed() < WARN_AGAIN => *n += 1,
                                _ => {
                                    let n = failed.map_or(0, |(_, n)| n);
                                    tracing::warn!(db = %path.display(), error = %e, failed_since_last_said = n, "WAL checkpoint failed");
                                    failed = Some((std::time::Instant::now(), n + 1));
                                }
                            }
                        }
                    }
                }
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
            passed,
        })
    }

    /// Whether a pass over a long WAL finished since the last call (then the writer's own
    /// pass has little left to copy).
    pub fn just_passed(&self) -> bool {
        self.passed.swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

/// One passive checkpoint: (frames in the WAL, frames copied).
fn passive(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
