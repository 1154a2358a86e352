//! Commits that fail for want of space wait for it, rather than stop the coordinator.
//!
//! A full file system (or a quota reached) fails a group's commit as a whole: SQLite rolls its
//! transaction back (`SQLITE_FULL`, or an I/O error whose system error is `ENOSPC` or
//! `EDQUOT`: [`sql_out_of_space`]), and the state journal cuts back what it had appended of
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

/// Whether an SQLite error says the file system is full or a quota is reached, `errno` being
/// the system's error number behind it when it is an I/O error ([`WriteError::with_errno`]).
/// SQLite's own code says so only of a write that found no room (`SQLITE_FULL`, from
/// `ENOSPC`) and of the WAL's index that could not grow (`SQLITE_IOERR_SHMSIZE`: SQLite writes
/// its pages before it maps them, so that a full disk is an error, not a SIGBUS). A quota
/// reached (`EDQUOT`) is to SQLite a failed write like any other (`SQLITE_IOERR_WRITE`), and
/// `ENOSPC` from a sync or a truncation an `SQLITE_IOERR_FSYNC` or `_TRUNCATE`: for its I/O
/// errors the system's number tells.
pub fn sql_out_of_space(e: &rusqlite::Error, errno: Option<i32>) -> bool {
    let rusqlite::Error::SqliteFailure(e, _) = e else {
        return false;
    };
    let space = |n| n == nix::libc::ENOSPC || n == nix::libc::EDQUOT;
    e.code == rusqlite::ErrorCode::DiskFull
        || e.extended_code == rusqlite::ffi::SQLITE_IOERR_SHMSIZE
        || (e.code == rusqlite::ErrorCode::SystemIoFailure && errno.is_some_and(space))
}

impl WriteError {
    /// Whether the write failed for want of space: then nothing of the group was kept, and
    /// it may be tried again once there is room.
    pub fn out_of_space(&self) -> bool {
        match self {
            WriteError::Sql(e) => sql_out_of_space(e, None),
            WriteError::SqlIo { source, errno } => sql_out_of_space(source, Some(*errno)),
            WriteError::Journal(e) | WriteError::Fold(e) => io_out_of_space(e),
        }
    }

    /// Adds to an SQLite I/O error the system's error number behind it, read from `conn`,
    /// the connection it happened on, before anything else failed there
    /// (`sqlite3_system_errno`: SQLite keeps the number of the last I/O error of each
    /// connection).
    pub(super) fn with_errno(self, conn: &rusqlite::Connection) -> Self {
        match self {
            WriteError::Sql(source @ rusqlite::Error::SqliteFailure(..))
                if source.sqlite_error_code() == Some(rusqlite::ErrorCode::SystemIoFailure) =>
            {
                // SAFETY: `conn` is open and borrowed for the call, on this thread;
                // sqlite3_system_errno only reads a field of its handle.
                let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(conn.handle()) };
                match errno {
                    0 => WriteError::Sql(source),
                    errno => WriteError::SqlIo { source, errno },
                }
            }
            other => other,
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

    /// A quota reached fails SQLite's write with an I/O error, not `SQLITE_FULL`; so may a full
    /// disk, at a sync or a truncation. Such errors used to stop the coordinator instead of
    /// making the commit wait for room.
    #[test]
    fn an_sqlite_io_error_is_out_of_space_when_its_system_error_is_a_full_disk_or_a_quota() {
        use nix::libc::{EDQUOT, EFBIG, EIO, ENOSPC};
        use rusqlite::ffi;
        let failure = |code| rusqlite::Error::SqliteFailure(ffi::Error::new(code), None);
        let io = |code, errno| WriteError::SqlIo {
            source: failure(code),
            errno,
        };
        for code in [
            ffi::SQLITE_IOERR_WRITE,
            ffi::SQLITE_IOERR_FSYNC,
            ffi::SQLITE_IOERR_TRUNCATE,
        ] {
            assert!(io(code, EDQUOT).out_of_space(), "{code}");
            assert!(io(code, ENOSPC).out_of_space(), "{code}");
            assert!(!io(code, EIO).out_of_space(), "{code}");
            assert!(!io(code, EFBIG).out_of_space(), "{code}");
        }
        // Only an I/O error's number counts (SQLite keeps the last one it saw, of whatever
        // error): not the failed open of a file, not a corrupt database.
        assert!(!io(ffi::SQLITE_CANTOPEN, EDQUOT).out_of_space());
        assert!(!io(ffi::SQLITE_CORRUPT, ENOSPC).out_of_space());
        assert!(!sql_out_of_space(&failure(ffi::SQLITE_IOERR_WRITE), None));
        assert!(sql_out_of_space(&failure(ffi::SQLITE_FULL), None));
        // The number is read only for an I/O error, and none is added where SQLite saw none.
        let conn = rusqlite::Connection::open_in_memory().expect("connection");
        let with = |code| WriteError::Sql(failure(code)).with_errno(&conn);
        assert!(matches!(with(ffi::SQLITE_IOERR_WRITE), WriteError::Sql(_)));
        assert!(matches!(with(ffi::SQLITE_FULL), WriteError::Sql(_)));
        let said = io(ffi::SQLITE_IOERR_WRITE, EDQUOT).to_string();
        assert!(said.contains(&format!("os error {EDQUOT}")), "{said}");
    }
}
