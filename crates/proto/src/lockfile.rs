//! One process to a directory: an exclusive `flock` on a lock file in it, held for the
//! process's life. The kernel releases it when the process ends however it ends, so a lock is
//! never stale and two processes can never both take it. The file holds a stamp of the holder
//! (its pid, and whatever else the caller adds), for the refusal's message; it is never removed
//! (removing it would let another process lock a new file while the first still holds the old
//! one). The coordinator locks its data directory with it, the worker its state directory.
//!
//! The lock file itself is never followed when it is a symbolic link: the worker locks
//! directories under a shared `/tmp` (its scratch directories, and those of dead workers it
//! sweeps), where another user could link `lock` to a file of the worker's user, which the
//! stamp's write would truncate.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// A held lock, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct FileLock {
    _flock: Flock<File>,
}

/// Why a lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it; `stamp` is what that process wrote in the file (empty when
    /// it could not be read).
    #[error("held by another process ({stamp})")]
    Held { stamp: String },
    /// The file could not be opened, locked or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Locks `path` (created if need be) for this process, writing `stamp` into it. A `path`
/// that is a symbolic link is refused (`Io`, `ELOOP`), its target untouched.
pub fn lock(path: &Path, stamp: &str) -> Result<FileLock, LockError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    let mut flock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            // From the file opened, not the path again: that could be a link by now.
            let mut stamp = String::new();
            if file.read_to_string(&mut stamp).is_err() {
                stamp.clear();
            }
            return Err(LockError::Held { stamp });
        }
        Err((_, errno)) => return Err(std::io::Error::from(errno).into()),
    };
    flock.set_len(0)?;
    flock.write_all(stamp.as_bytes())?;
    Ok(FileLock { _flock: flock })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_refused_with_its_holders_stamp_until_it_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.lock");
        let first = lock(&path, "123 456").expect("the first lock");
        match lock(&path, "789") {
            Err(LockError::Held { stamp }) => assert_eq!(stamp, "123 456"),
            other => panic!("a second lock: {other:?}"),
        }
        drop(first);
        // The file stays; the next holder's stamp replaces the last one whole.
        let _second = lock(&path, "9").expect("free again");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "9");
        let missing = dir.path().join("no-such-dir").join("x.lock");
        assert!(matches!(lock(&missing, "1"), Err(LockError::Io(_))));
    }

    /// A lock file that is a symbolic link (planted in a shared directory by another user) is
    /// refused, and the file it names keeps its bytes: following it, the stamp's write
    /// truncated whatever file of this user it named.
    #[test]
    fn a_lock_file_that_is_a_symlink_is_refused_and_its_target_left_intact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("bashrc");
        std::fs::write(&target, "export PATH=/usr/bin\n").expect("target");
        let link = dir.path().join("lock");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        match lock(&link, "123 456") {
            Err(LockError::Io(e)) => assert_eq!(e.raw_os_error(), Some(nix::libc::ELOOP), "{e}"),
            other => panic!("a symlinked lock file: {other:?}"),
        }
        assert_eq!(
            std::fs::read_to_string(&target).expect("read"),
            "export PATH=/usr/bin\n"
        );
    }
}
