//! One process to a directory: an exclusive `flock` on a lock file in it, held for the
//! process's life. The kernel releases it when the process ends however it ends, so a lock is
//! never stale and two processes can never both take it. The file holds a stamp of the holder
//! (its pid, and whatever else the caller adds), for the refusal's message; it is never removed
//! (removing it would let another process lock a new file while the first still holds the old
//! one). The coordinator locks its data directory with it, the worker its state directory.

use std::fs::File;
use std::io::Write;
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

/// Locks `path` (created if need be) for this process, writing `stamp` into it.
pub fn lock(path: &Path, stamp: &str) -> Result<FileLock, LockError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let mut flock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let stamp = std::fs::read_to_string(path).unwrap_or_default();
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
}
