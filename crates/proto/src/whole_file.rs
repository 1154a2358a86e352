//! A new database file made whole before it takes its name, for the coordinator's store and
//! the worker's state directory.

use std::path::{Path, PathBuf};

/// What stopped [`create_whole`].
#[derive(Debug)]
pub enum Failed<E> {
    /// A file operation on `path`.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The caller's `fill`.
    Fill(E),
}

/// `path` with `suffix` appended to its name (`-wal`, `.new`).
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut f = path.as_os_str().to_owned();
    f.push(suffix);
    PathBuf::from(f)
}

/// Makes a new file at `path` with `mode` whatever the umask, filled by `fill` (SQLite writes
/// its header), under another name (`path` with `.new`), synced, renamed into place, and its
/// directory synced. A process killed while making it leaves that name, which the next call
/// removes with what SQLite may have left beside it (`-wal`, `-shm`, `-journal`), never a
/// half-made file at `path`, which a next start would take for an emptied database.
pub fn create_whole<E>(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), Failed<E>> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Failed::Io { path, source }
    };
    let new = sibling(path, ".new");
    for suffix in [".new", ".new-wal", ".new-shm", ".new-journal"] {
        let left = sibling(path, suffix);
        match std::fs::remove_file(&left) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&left)(e)),
            _ => {}
        }
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&new)
        // A umask that takes the owner's bits too (0277) would leave it unwritable.
        .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(mode)))
        .map_err(io(&new))?;
    fill(&new).map_err(Failed::Fill)?;
    std::fs::File::open(&new)
        .and_then(|f| f.sync_all())
        .and_then(|()| std::fs::rename(&new, path))
        .map_err(io(path))?;
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The file takes its name only once filled, with its mode whatever the umask; what a
    /// killed attempt left is removed first; a failed fill leaves nothing at `path`.
    #[test]
    fn a_file_takes_its_name_only_filled_and_a_killed_attempts_leftovers_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        for suffix in [".new", ".new-wal", ".new-journal"] {
            std::fs::write(sibling(&path, suffix), b"left by a killed attempt").expect("write");
        }
        let failed = create_whole(&path, 0o600, |new| {
            assert!(!path.exists(), "not at its name while being filled");
            assert_eq!(std::fs::read(new).expect("read"), b"", "made afresh");
            Err("no header")
        });
        assert!(matches!(failed, Err(Failed::Fill("no header"))));
        assert!(!path.exists(), "a failed fill leaves nothing at its name");
        create_whole(&path, 0o600, |new| std::fs::write(new, b"header")).expect("made");
        assert_eq!(std::fs::read(&path).expect("read"), b"header");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        for suffix in [".new", ".new-wal", ".new-shm", ".new-journal"] {
            assert!(!sibling(&path, suffix).exists(), "{suffix}");
        }
    }

    /// A leftover that cannot be removed (a directory at its name) stops it, naming it.
    #[test]
    fn a_leftover_that_cannot_go_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        std::fs::create_dir(sibling(&path, ".new-wal")).expect("mkdir");
        match create_whole(&path, 0o600, |_| Ok::<(), ()>(())) {
            Err(Failed::Io { path: p, .. }) => assert_eq!(p, sibling(&path, ".new-wal")),
            other => panic!("{other:?}"),
        }
    }
}
