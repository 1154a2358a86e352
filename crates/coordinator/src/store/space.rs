//! Commits that fail for want of space wait for it, rather than stop the coordinator.
//!
//! A full file system (or a quota reached) fails a group's commit as a whole: SQLite rolls its
//! transaction back (`SQLITE_FULL`), and the state journal cuts back what it had appended of
//! the group (`super::states::States::append`). Nothing of the group is kept and nothing of
//! it was acknowledged, so the writer may try the same group again, and does, with a growing
//! pause, until it commits: the coordinator waits for space instead of stopping (which a
//! supervisor's restart would only repeat). Meanwhile the writer's queue fills, the core waits
//! on it, and the workers keep what they produced in their outboxes; submissions are refused
//! with `503` at once ([`super::StoreStats::out_of_space`]). Once an operator frees space, the
//! held group commits, and everything behind it follows.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::StoreStats;
use super::states::WriteError;

/// The first pause before a group is tried again.
pub const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between two tries.
pub const RETRY_MOST: Duration = Duration::from_secs(5);
/// How often the error is repeated while the writer waits.
pub const SAY_AGAIN: Duration = Duration::from_secs(60);

/// Whether an I/O error says the file system is full or a quota is reached.
pub fn io_out_of_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

impl WriteError {
    /// Whether the write failed for want of space: then nothing of the group was kept, and
    /// it may be tried again once there is room.
    pub fn out_of_space(&self) -> bool {
        match self {
            // A write that found no room, or the WAL's index that could not grow (SQLite
            // writes its pages before it maps them, so that a full disk is an error, not a
            // SIGBUS).
            WriteError::Sql(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
                    || e.extended_code == rusqlite::ffi::SQLITE_IOERR_SHMSIZE
            }
            WriteError::Sql(_) => false,
            WriteError::Journal(e) | WriteError::Fold(e) => io_out_of_space(e),
        }
    }
}

/// A wait for space: from the first failed try of a group until it commits.
pub(super) struct Stall<'a> {
    stats: &'a StoreStats,
    began: Instant,
    said: Instant,
    tries: u64,
    pause: Duration,
}

impl<'a> Stall<'a> {
    /// The first try failed with `error`: says so, and marks the store out of space.
    pub fn begin(stats: &'a StoreStats, db: &Path, error: &WriteError) -> Self {
        tracing::error!(db = %db.display(), %error, "the data directory is out of space: the commit waits for room and is tried again; nothing is acknowledged meanwhile, and submissions are refused; free space to resume");
        stats.out_of_space.store(true, Ordering::Release);
        stats.stalls.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::STORE_OUT_OF_SPACE).set(1.0);
        let now = Instant::now();
        Stall {
            stats,
            began: now,
            said: now,
            tries: 1,
            pause: RETRY_FIRST,
        }
    }

    /// Pauses before the next try (longer each time, up to [`RETRY_MOST`]); another try
    /// failed with `error` (said again every [`SAY_AGAIN`]).
    pub fn pause(&mut self, db: &Path, error: &WriteError) {
        if self.said.elapsed() >= SAY_AGAIN {
            self.said = Instant::now();
            tracing::error!(db = %db.display(), %error, tries = self.tries, waited_s = self.began.elapsed().as_secs(), "the data directory is still out of space; the commit waits");
        }
        std::thread::sleep(self.pause);
        self.pause = (self.pause * 2).min(RETRY_MOST);
        self.tries += 1;
    }

    /// The group committed.
    pub fn end(self, db: &Path) {
        self.stats.out_of_space.store(false, Ordering::Release);
        metrics::gauge!(crate::metrics::STORE_OUT_OF_SPACE).set(0.0);
        tracing::warn!(db = %db.display(), tries = self.tries, waited_ms = self.began.elapsed().as_millis() as u64, "space again: the waiting commit went through, and the store goes on");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_space_is_a_full_disk_or_a_quota_and_nothing_else() {
        let full = |code| {
            WriteError::Sql(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        assert!(full(rusqlite::ffi::SQLITE_FULL).out_of_space());
        assert!(full(rusqlite::ffi::SQLITE_IOERR_SHMSIZE).out_of_space());
        assert!(!full(rusqlite::ffi::SQLITE_IOERR).out_of_space());
        assert!(!full(rusqlite::ffi::SQLITE_IOERR_FSYNC).out_of_space());
        assert!(!full(rusqlite::ffi::SQLITE_CORRUPT).out_of_space());
        let os = |errno| WriteError::Journal(std::io::Error::from_raw_os_error(errno));
        assert!(os(nix::libc::ENOSPC).out_of_space());
        assert!(os(nix::libc::EDQUOT).out_of_space());
        assert!(!os(nix::libc::EIO).out_of_space());
        assert!(!os(nix::libc::EACCES).out_of_space());
    }
}
