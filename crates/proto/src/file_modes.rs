//! For tests of the files the coordinator and the worker keep their user's alone: the modes of
//! a tree, and the umask of the usual system for a test's length.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The permission bits of `path` (a symlink's own).
pub fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o7777
}

/// Every entry under `dir`, with its mode. Bounded: a test makes no tree deeper than a few
/// levels, nor many files.
pub fn modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        assert!(found.len() < 1000, "more entries than a test makes");
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path.clone());
            }
            let m = mode(&path);
            found.push((path, m));
        }
    }
    found
}

/// The umask of the usual system for the test's length (it makes files 0644 and directories
/// 0755), the one it found put back after.
pub struct Umask(nix::sys::stat::Mode);

impl Umask {
    pub fn usual() -> Self {
        Umask(nix::sys::stat::umask(
            nix::sys::stat::Mode::from_bits_truncate(0o022),
        ))
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        nix::sys::stat::umask(self.0);
    }
}
