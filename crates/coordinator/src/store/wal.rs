//! Checkpoints of the write-ahead log, off the writer's thread.

use std::cell::Cell;
use std::ffi::c_int;
use std::path::Path;

use rusqlite::Connection;

/// How often the checkpointer copies the WAL into the database.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// Frames in the WAL past which the writer finishes a checkpoint itself, so that the WAL
/// starts over (4096 frames of 4 KiB pages: 16 MiB).
pub const WAL_RESTART_FRAMES: u64 = 4096;

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
    // (busy, frames in the WAL, frames copied)
    let (log, copied): (i64, i64) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })?;
    if log == copied {
        WAL_FRAMES.set(0);
    }
    Ok(())
}

/// Copies the WAL into the database every [`CHECKPOINT_EVERY`], from a connection and thread
/// of its own. SQLite's automatic checkpoint runs inside the commit that crosses its threshold:
/// with it, commits of a single mutation took 4-7 ms now and then under the flood; without it,
/// 99.7 % of commits take under 0.5 ms. Stops when dropped.
pub(super) struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    pub fn start(path: &Path) -> std::io::Result<Self> {
        let conn = Connection::open(path)
            .and_then(|c| c.execute_batch("PRAGMA busy_timeout = 5000;").map(|()| c))
            .map_err(std::io::Error::other)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let path = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("tether-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE);") {
                        tracing::warn!(db = %path.display(), error = %e, "WAL checkpoint failed");
                    }
                }
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
