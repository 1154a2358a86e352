//! One coordinator to a data directory.
//!
//! Two coordinators on one data directory would each take the other's workers for lost and
//! move their tasks, and give the same submission numbers twice (each counts from what it
//! loaded). The first takes `tether.lock` in the directory for its whole life
//! ([`tether_proto::lockfile`], as the worker its state directory), writing its pid there, and a
//! second coordinator is refused at start, naming the first.

use std::path::{Path, PathBuf};

use tether_proto::lockfile::{FileLock, LockError};

use super::StoreError;

/// The lock file in the data directory.
pub const LOCK_FILE: &str = "tether.lock";

/// The data directory's lock, held while it lives.
#[derive(Debug)]
pub struct DirLock {
    _lock: FileLock,
    /// The lock file, when it does not name this process yet: taken on a full disk, without
    /// its stamp ([`lock_dir`]).
    unstamped: Option<PathBuf>,
}

impl DirLock {
    /// Whether the lock file names this process (it does not when the lock was taken on a full
    /// disk, until [`DirLock::stamp`] writes it).
    pub fn stamped(&self) -> bool {
        self.unstamped.is_none()
    }

    /// Writes this process's pid into a lock file taken without it (on a full disk), once
    /// there may be room: after the store's open, which waits for room. Says whether it did;
    /// if it still cannot, the lock holds all the same, and a second coordinator is refused
    /// without the pid.
    pub fn stamp(&mut self) {
        let Some(path) = &self.unstamped else {
            return;
        };
        match write_stamp(path) {
            Ok(()) => {
                tracing::info!(lock = %path.display(), "the data directory's lock file names this coordinator now");
                self.unstamped = None;
            }
            Err(e) => {
                tracing::warn!(lock = %path.display(), error = %e, "the data directory's lock file still cannot name this coordinator; the directory is locked all the same");
            }
        }
    }
}

/// This process's stamp in the lock file (its pid).
fn pid() -> String {
    std::process::id().to_string()
}

/// Writes [`pid`] over the lock file at `path`, which this process holds the lock of (never
/// following a link: the lock file is never one, `tether_proto::lockfile`).
fn write_stamp(path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    #[cfg(test)]
    if super::space::full::hit(path.parent().unwrap_or(path)) {
        return Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC));
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    file.set_len(0)?;
    file.write_all(pid().as_bytes())
}

/// Locks `path`, writing `stamp` into it (`tether_proto::lockfile::lock`). Tests make the
/// stamp's write find no room in a directory they filled (`super::space::full`).
fn take(path: &Path, stamp: &str) -> Result<FileLock, LockError> {
    #[cfg(test)]
    if !stamp.is_empty() && super::space::full::hit(path.parent().unwrap_or(path)) {
        // As the lock's write on a full disk: the lock taken, the file emptied, and released.
        drop(tether_proto::lockfile::lock(path, "")?);
        return Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC).into());
    }
    tether_proto::lockfile::lock(path, stamp)
}

/// Creates the data directory if need be (for its user alone) and locks it.
///
/// On a full disk (or a quota reached) the pid cannot be written into the lock file: the lock
/// is then taken without it, and a warning says so. The lock is what keeps a second coordinator
/// out, and it holds without the stamp (which only names the holder in the second one's
/// refusal); the start goes on to open the store, which waits for room as the rest of the
/// start does ([`super::open_until`]), and the pid is written once the store is open
/// ([`DirLock::stamp`]). Refusing here instead stopped the coordinator at once on a disk
/// that was full to the last block, where a start one block less full waited for room.
pub fn lock_dir(dir: &Path) -> Result<DirLock, StoreError> {
    super::make_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let locked = |r| match r {
        Ok(lock) => {
            private(&path);
            Ok(lock)
        }
        Err(LockError::Held { stamp }) => Err(StoreError::Locked {
            path: dir.to_owned(),
            holder: stamp.trim().parse().ok(),
        }),
        // A lock file that cannot be made for want of room (no inode, or no block, for it):
        // nothing was made, and it may be tried again ([`super::lock_and_open`] waits).
        Err(LockError::Io(source)) if super::space::io_out_of_space(&source) => {
            Err(StoreError::OutOfSpace {
                path: path.clone(),
                source: super::WriteError::Dir(source),
            })
        }
        Err(LockError::Io(source)) => Err(StoreError::Access {
            path: path.clone(),
            source,
        }),
    };
    match take(&path, &pid()) {
        Err(LockError::Io(e)) if super::space::io_out_of_space(&e) => {
            // The failed write released the lock: taken again, with nothing to write (another
            // process that took it meanwhile holds it, and this one is refused).
            let lock = locked(take(&path, ""))?;
            tracing::warn!(lock = %path.display(), error = %e, "the data directory is out of space: its lock is taken without this coordinator's pid in the lock file (written once the store is open); a second coordinator is still refused");
            Ok(DirLock {
                _lock: lock,
                unstamped: Some(path.clone()),
            })
        }
        r => Ok(DirLock {
            _lock: locked(r)?,
            unstamped: None,
        }),
    }
}

/// Makes the lock file at `path`, which this process holds, its user's alone as the store's
/// other files are ([`super::FILE_MODE`]): `tether_proto::lockfile` makes it with the umask's
/// mode. It holds only a pid: a failure here is left to the store's open, which tries again
/// and warns (`super::tighten_files`).
fn private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(super::FILE_MODE));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_data_directory_is_refused_naming_its_holder_until_the_lock_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let first = lock_dir(&data).expect("the first lock");
        match lock_dir(&data) {
            Err(StoreError::Locked { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()));
            }
            other => panic!("a second lock: {other:?}"),
        }
        let said = lock_dir(&data).expect_err("still locked").to_string();
        assert!(said.contains("in use by another coordinator"), "{said}");
        drop(first);
        lock_dir(&data).expect("free again");
    }

    /// On a full disk the pid cannot be written into the lock file: the lock is taken all the
    /// same (a second coordinator is refused, naming no pid), and the pid is written once
    /// there is room. The lock's write failed and the start was refused before.
    #[test]
    fn a_full_disk_takes_the_lock_without_its_stamp_and_writes_it_once_there_is_room() {
        use super::super::space::full;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data");
        full::fill(&data);
        let mut first = lock_dir(&data).expect("locked on a full disk");
        assert!(!first.stamped());
        assert!(full::failed(&data) > 0, "no write found the disk full");
        match lock_dir(&data) {
            Err(StoreError::Locked { holder, .. }) => assert_eq!(holder, None),
            other => panic!("a second lock: {other:?}"),
        }
        // Still full: the stamp waits, the lock holds.
        first.stamp();
        assert!(!first.stamped());
        full::free(&data);
        first.stamp();
        assert!(first.stamped());
        match lock_dir(&data) {
            Err(StoreError::Locked { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()));
            }
            other => panic!("a second lock: {other:?}"),
        }
    }
}
