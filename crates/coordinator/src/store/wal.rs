//! Checkpoints of the write-ahead log, off the writer's thread.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::Connection;

/// How often the checkpointer copies the WAL into the database.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// Frames in the WAL past which the writer finishes a checkpoint itself, so that the WAL
/// starts over (4096 frames of 4 KiB pages: 16 MiB).
pub const WAL_RESTART_FRAMES: u64 = 4096;

/// Copies the WAL into the database every [`CHECKPOINT_EVERY`], from a connection and thread
/// of its own (SQLite's automatic checkpoint runs inside a commit, which then took 4-7 ms
/// instead of well under one). Stops when dropped.
pub(super) struct Checkpointer {
    /// Frames in the WAL at the last checkpoint.
    pub wal_frames: Arc<AtomicU64>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    pub fn start(path: &Path) -> std::io::Result<Self> {
        let conn = Connection::open(path)
            .and_then(|c| c.execute_batch("PRAGMA busy_timeout = 5000;").map(|()| c))
            .map_err(std::io::Error::other)?;
        let wal_frames = Arc::new(AtomicU64::new(0));
        let frames = wal_frames.clone();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let path = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("tether-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    // (busy, frames in the WAL, frames copied)
                    let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        r.get::<_, i64>(1)
                    });
                    match done {
                        Ok(n) => frames.store(n.max(0) as u64, Ordering::Relaxed),
                        Err(e) => {
                            tracing::warn!(db = %path.display(), error = %e, "WAL checkpoint failed")
                        }
                    }
                }
            })?;
        Ok(Checkpointer {
            wal_frames,
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
