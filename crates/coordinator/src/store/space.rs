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
//!
//! Opening the store waits for space the same way ([`super::open_until`]; making and locking a
//! data directory not there yet too, [`super::lock_and_open`]): a coordinator
//! stopped during a wait leaves its state journal to the next start, which replays it into
//! the database (and reads the database at all only with room for its WAL index), then makes
//! a journal file of its own; a restart while the disk is still full would otherwise fail there
//! and exit, again at every restart of its supervisor. Each step of the open changes nothing
//! when it fails for space (a transaction rolled back, a file not made), so it is tried again
//! until it goes through, or until the coordinator is stopped; meanwhile every request is
//! answered `503 starting` (the metrics excepted: `crate::server`).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::states::WriteError;
use super::{StoreError, StoreStats};

/// The first pause before a group is tried again.
pub const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between two tries.
pub const RETRY_MOST: Duration = Duration::from_secs(5);
/// How often the error is repeated while the writer waits.
pub const SAY_AGAIN: Duration = Duration::from_secs(60);
/// How often a pause looks whether the coordinator is stopping.
const STOP_LOOK: Duration = Duration::from_millis(50);

/// Whether an I/O error says the file system is full or a quota is reached.
pub fn io_out_of_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Whether an SQLite error says the file system is full or a quota is reached, `errno` being
/// the system's error number behind it when it is an I/O error (`WriteError::with_errno`).
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
            WriteError::Journal(e) | WriteError::Fold(e) | WriteError::Dir(e) => io_out_of_space(e),
        }
    }

    /// Adds to an SQLite I/O error the system's error number behind it, read from `conn`,
    /// the connection it happened on, before anything else failed there
    /// (`sqlite3_system_errno`: SQLite keeps the number of the last I/O error of each
    /// connection).
    pub(super) fn with_errno(self, conn: &rusqlite::Connection) -> Self {
        match self {
            WriteError::Sql(source) => match system_errno(conn, &source) {
                Some(errno) => WriteError::SqlIo { source, errno },
                None => WriteError::Sql(source),
            },
            other => other,
        }
    }
}

/// The system's error number behind `e` when it is an SQLite I/O error, read from `conn`, the
/// connection it happened on, before anything else failed there (`sqlite3_system_errno`:
/// SQLite keeps the number of the last I/O error of each connection).
fn system_errno(conn: &rusqlite::Connection, e: &rusqlite::Error) -> Option<i32> {
    if e.sqlite_error_code() != Some(rusqlite::ErrorCode::SystemIoFailure) {
        return None;
    }
    // SAFETY: `conn` is open and borrowed for the call, on this thread; sqlite3_system_errno
    // only reads a field of its handle.
    let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(conn.handle()) };
    (errno != 0).then_some(errno)
}

/// `source`, an SQLite error on `conn` while the store opens its database at `db`:
/// [`StoreError::OutOfSpace`] when it says there is no room (a read too may need some: the
/// WAL's index is made at the first), else what `other` makes of it.
pub(super) fn or_out_of_space(
    conn: &rusqlite::Connection,
    db: &Path,
    source: rusqlite::Error,
    other: impl FnOnce(rusqlite::Error) -> StoreError,
) -> StoreError {
    let errno = system_errno(conn, &source);
    if !sql_out_of_space(&source, errno) {
        return other(source);
    }
    StoreError::OutOfSpace {
        path: db.to_owned(),
        source: match errno {
            Some(errno) => WriteError::SqlIo { source, errno },
            None => WriteError::Sql(source),
        },
    }
}

/// `e`, an error of the open of the database at `db`, as [`StoreError::OutOfSpace`] when
/// SQLite could not open a file of it (`SQLITE_CANTOPEN`: the database, its WAL or its index
/// to be made) on a file system with no inode or no block left: SQLite says no more than that
/// it could not open the file, and without room for it the file cannot be made. Other errors
/// are `e` (and so is one found with room: a file that cannot be opened for another reason).
pub(super) fn cannot_open_for_space(db: &Path, e: StoreError) -> StoreError {
    let (path, source) = match e {
        StoreError::Open { path, source } | StoreError::Sql { path, source }
            if source.sqlite_error_code() == Some(rusqlite::ErrorCode::CannotOpen)
                && no_room(db.parent().unwrap_or(Path::new("."))) =>
        {
            (path, source)
        }
        e => return e,
    };
    StoreError::OutOfSpace {
        path,
        source: WriteError::SqlIo {
            source,
            errno: nix::libc::ENOSPC,
        },
    }
}

/// Whether the file system holding `dir` has no inode or no block left for this process
/// ([`crate::disk::Room::exhausted`]: only what the file system counts can run out; on ext2,
/// ext3 or ext4, where the kernel gives them to this process (`CAP_SYS_RESOURCE`, or the file
/// system's `resuid` or `resgid`), the blocks and inodes kept for the superuser count, which
/// others may not use, but not what ext4 keeps from everyone: [`crate::disk::Writer::of`], as
/// the free-space watcher counts them). A file system full to others (ext4 keeps 5 % of its
/// blocks for root) was taken for full for a coordinator running as root, and a database it
/// could not open for another reason was waited on for room instead of refused with SQLite's
/// error. A file system that counts no inodes (statvfs says 0 of them, 0 free: btrfs, vfat, a
/// tmpfs without `nr_inodes`) or no blocks (a tmpfs without `size`) was taken for full, and
/// every file SQLite could not open there, for whatever reason, was waited on as a full disk
/// for ever instead of refused.
fn no_room(dir: &Path) -> bool {
    use crate::disk::{Room, SYS, Writer};
    Room::of(dir).is_ok_and(|r| r.exhausted(Writer::of(dir, &r, Path::new(SYS))))
}

/// What waits for space: what the log says of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Waiting {
    /// A group's commit (the writer).
    Commit,
    /// The state journal's first file, which the writer makes before it takes a group.
    Journal,
    /// The store's open: nothing but `503 starting` is served until it is done.
    Open,
}

impl Waiting {
    fn begins(self) -> &'static str {
        match self {
            Waiting::Commit => {
                "the data directory is out of space: the commit waits for room and is tried again; nothing is acknowledged meanwhile, and submissions are refused; free space to resume"
            }
            Waiting::Journal => {
                "the data directory is out of space: the state journal cannot be started; it waits for room and is tried again, and nothing is committed or acknowledged meanwhile, and submissions are refused; free space to resume"
            }
            Waiting::Open => {
                "the data directory is out of space: the store cannot be opened (the directory or its lock file to make, a journal of task states to replay, or the database's WAL index to make); it waits for room and is tried again, every request answered 503 (starting) meanwhile (workers keep what they produced); free space to start"
            }
        }
    }

    fn lasts(self) -> &'static str {
        match self {
            Waiting::Commit => "the data directory is still out of space; the commit waits",
            Waiting::Journal => {
                "the data directory is still out of space; the state journal waits to be started"
            }
            Waiting::Open => "the data directory is still out of space; opening the store waits",
        }
    }

    fn ends(self) -> &'static str {
        match self {
            Waiting::Commit => {
                "space again: the waiting commit went through, and the store goes on"
            }
            Waiting::Journal => "space again: the state journal is started, and the store goes on",
            Waiting::Open => "space again: the store is open, and the coordinator starts",
        }
    }
}

/// A wait for space: from the first failed try until one goes through.
pub(super) struct Stall<'a> {
    stats: &'a StoreStats,
    what: Waiting,
    began: Instant,
    said: Instant,
    tries: u64,
    pause: Duration,
}

impl<'a> Stall<'a> {
    /// The first try failed with `error`: says so, and marks the store out of space.
    pub fn begin(
        stats: &'a StoreStats,
        what: Waiting,
        db: &Path,
        error: &dyn std::fmt::Display,
    ) -> Self {
        tracing::error!(db = %db.display(), %error, "{}", what.begins());
        stats.out_of_space.store(true, Ordering::Release);
        stats.stalls.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::STORE_OUT_OF_SPACE).set(1.0);
        let now = Instant::now();
        Stall {
            stats,
            what,
            began: now,
            said: now,
            tries: 1,
            pause: RETRY_FIRST,
        }
    }

    /// Pauses before the next try (longer each time, up to [`RETRY_MOST`]), or until `stop`;
    /// another try failed with `error` (said again every [`SAY_AGAIN`]).
    pub fn pause(&mut self, db: &Path, error: &dyn std::fmt::Display, stop: &CancellationToken) {
        if self.said.elapsed() >= SAY_AGAIN {
            self.said = Instant::now();
            tracing::error!(db = %db.display(), %error, tries = self.tries, waited_s = self.began.elapsed().as_secs(), "{}", self.what.lasts());
        }
        let until = Instant::now() + self.pause;
        while !stop.is_cancelled() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(STOP_LOOK));
        }
        self.pause = (self.pause * 2).min(RETRY_MOST);
        self.tries += 1;
    }

    /// A try went through.
    pub fn end(self, db: &Path) {
        self.stats.out_of_space.store(false, Ordering::Release);
        metrics::gauge!(crate::metrics::STORE_OUT_OF_SPACE).set(0.0);
        tracing::warn!(db = %db.display(), tries = self.tries, waited_ms = self.began.elapsed().as_millis() as u64, "{}", self.what.ends());
    }
}

/// The steps of the store's open, each tried again while it fails for want of space
/// ([`StoreError::OutOfSpace`]) until it goes through or `stop` is cancelled.
pub(super) struct OpenWait<'a> {
    db: &'a Path,
    stop: &'a CancellationToken,
    /// The open's own: nothing else reads them (the core is not started yet); the gauge is
    /// the process's.
    stats: &'a StoreStats,
    stall: Option<Stall<'a>>,
}

impl<'a> OpenWait<'a> {
    pub fn new(db: &'a Path, stats: &'a StoreStats, stop: &'a CancellationToken) -> Self {
        OpenWait {
            db,
            stop,
            stats,
            stall: None,
        }
    }

    /// Runs `step` until it goes through, or fails other than for space, or fails for space
    /// once `stop` is cancelled. `step` must change nothing when it fails for space, so that
    /// it may be run again.
    pub fn retry<T>(
        &mut self,
        mut step: impl FnMut() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        loop {
            let e = match step() {
                Err(StoreError::OutOfSpace { source, .. }) => source,
                done => return done,
            };
            if self.stop.is_cancelled() {
                tracing::warn!(db = %self.db.display(), "stopping while out of space, before the store was opened: nothing was changed, and the next start opens it");
                return Err(StoreError::OutOfSpace {
                    path: self.db.to_owned(),
                    source: e,
                });
            }
            match &mut self.stall {
                Some(stall) => stall.pause(self.db, &e, self.stop),
                None => {
                    let mut stall = Stall::begin(self.stats, Waiting::Open, self.db, &e);
                    stall.pause(self.db, &e, self.stop);
                    self.stall = Some(stall);
                }
            }
        }
    }

    /// Every step went through: says so if any waited.
    pub fn done(self) {
        if let Some(stall) = self.stall {
            stall.end(self.db);
        }
    }
}

/// Tests: data directories taken for full, whose replays' commits and new journal files fail
/// for want of space (`super::states`) until they are given room again.
#[cfg(test)]
pub(super) mod full {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// Each full directory, with the writes that failed in it so far.
    static DIRS: Mutex<Vec<(PathBuf, u64)>> = Mutex::new(Vec::new());

    fn dirs() -> std::sync::MutexGuard<'static, Vec<(PathBuf, u64)>> {
        DIRS.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn fill(dir: &Path) {
        dirs().push((dir.to_owned(), 0));
    }

    pub fn free(dir: &Path) {
        dirs().retain(|(d, _)| d != dir);
    }

    /// The writes that failed in `dir` since it was filled.
    pub fn failed(dir: &Path) -> u64 {
        dirs().iter().find(|(d, _)| d == dir).map_or(0, |(_, n)| *n)
    }

    /// Whether a write in `dir` finds no room (counted).
    pub(in crate::store) fn hit(dir: &Path) -> bool {
        let mut dirs = dirs();
        let found = dirs.iter_mut().find(|(d, _)| d == dir);
        found.map(|(_, n)| *n += 1).is_some()
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

    /// Opening, a read that cannot make the WAL's index (no room for it) failed as a corrupt
    /// database, and the refusal told the operator to move the database away.
    #[test]
    fn an_open_that_finds_no_room_is_out_of_space_not_corrupt() {
        use rusqlite::ffi;
        let conn = rusqlite::Connection::open_in_memory().expect("connection");
        let db = Path::new("/data/tether.db");
        let fail = |code| {
            let e = rusqlite::Error::SqliteFailure(ffi::Error::new(code), None);
            or_out_of_space(&conn, db, e, |e| StoreError::Corrupt {
                path: db.to_owned(),
                detail: e.to_string(),
            })
        };
        for code in [ffi::SQLITE_IOERR_SHMSIZE, ffi::SQLITE_FULL] {
            match fail(code) {
                StoreError::OutOfSpace { path, source } => {
                    assert_eq!(path, db);
                    assert!(source.out_of_space(), "{source}");
                }
                other => panic!("{code}: {other}"),
            }
        }
        assert!(matches!(
            fail(ffi::SQLITE_CORRUPT),
            StoreError::Corrupt { .. }
        ));
        assert!(matches!(
            fail(ffi::SQLITE_IOERR_READ),
            StoreError::Corrupt { .. }
        ));
    }
}
