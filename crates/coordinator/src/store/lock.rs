//! One coordinator to a data directory.
//!
//! Two coordinators on one data directory would each take the other's workers for lost and
//! move their tasks, and give the same submission numbers twice (each counts from what it
//! loaded). The first takes `tether.lock` in the directory for its whole life
//! ([`tether_proto::lockfile`], as the worker its state directory), writing its pid there, and a
//! second coordinator is refused at start, naming the first.

use std::path::Path;

use tether_proto::lockfile::{FileLock, LockError};

use super::StoreError;

/// The lock file in the data directory.
pub const LOCK_FILE: &str = "tether.lock";

/// The data directory's lock, held while it lives.
#[derive(Debug)]
pub struct DirLock {
    _lock: FileLock,
}

/// Creates the data directory if need be (for its user alone) and locks it.
pub fn lock_dir(dir: &Path) -> Result<DirLock, StoreError> {
    super::make_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    match tether_proto::lockfile::lock(&path, &std::process::id().to_string()) {
        Ok(lock) => Ok(DirLock { _lock: lock }),
        Err(LockError::Held { stamp }) => Err(StoreError::Locked {
            path: dir.to_owned(),
            holder: stamp.trim().parse().ok(),
        }),
        Err(LockError::Io(source)) => Err(StoreError::Access { path, source }),
    }
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
