//! One coordinator to a data directory.
//!
//! Two coordinators on one data directory would each take the other's workers for lost and
//! move their tasks, and give the same submission numbers twice (each counts from what it
//! loaded). The first takes an exclusive `flock` on `tether.lock` in the directory for its whole
//! life; the kernel releases it when the process ends however it ends, so a lock is never
//! stale, and a second coordinator is refused at start, naming the first. The file holds the
//! holder's pid, for that message; it is never removed (removing it would let another process
//! lock a new file while the first still holds the old one).
//!
//! The worker's state directory is locked the same way (`tether_worker::statedir`'s
//! `LockFile`, which also records the holder's start time); the two share no crate below
//! them but the wire types', so each keeps its own few lines. Change one, look at the other.

use std::io::Write;
use std::path::Path;

use super::StoreError;

/// The lock file in the data directory.
pub const LOCK_FILE: &str = "tether.lock";

/// The data directory's lock, held while it lives.
#[derive(Debug)]
pub struct DirLock {
    _flock: nix::fcntl::Flock<std::fs::File>,
}

/// Creates the data directory if need be (for its user alone) and locks it.
pub fn lock_dir(dir: &Path) -> Result<DirLock, StoreError> {
    use nix::fcntl::{Flock, FlockArg};
    super::make_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let io = |source| StoreError::Access {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    let mut flock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let held = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(StoreError::Locked {
                path: dir.to_owned(),
                holder: held.trim().parse().ok(),
            });
        }
        Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
    };
    flock
        .set_len(0)
        .and_then(|()| write!(flock, "{}", std::process::id()))
        .map_err(io)?;
    Ok(DirLock { _flock: flock })
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
}
