//! The worker's files are its user's alone whatever the umask: the state directory holds task
//! results and output in its outbox, checkpoints (a task's own files), and task specs whose
//! `env` often carries credentials; made 0644 under the usual umask, a state directory made
//! 0755 beforehand (by a package, or by hand) showed them to every local user. As the
//! coordinator's store does (`store::schema::create_private`, `store::tighten_files`): a
//! database file is made [`FILE_MODE`] before SQLite opens it (SQLite gives its `-wal`, `-shm`
//! and rollback journal the database file's mode, umask or not), and files found open to
//! others at open (made by an older worker) are made private, each said at WARN with its old
//! mode.

use std::path::Path;

/// The mode of every file the worker makes for itself: its user's alone.
pub(crate) const FILE_MODE: u32 = 0o600;
/// The mode of every directory the worker makes for itself. A task's checkpoint directory is
/// one too: the task runs as the worker's user, which is all that has to use it.
pub(crate) const DIR_MODE: u32 = 0o700;

/// Makes the file at `path`, empty, with [`FILE_MODE`] whatever the umask, unless it exists.
/// An empty file is what SQLite makes a new database of.
pub(crate) fn create_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        // A umask that takes the owner's bits too (0277) would leave it unwritable.
        .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE)));
    match made {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Makes the directory `dir` and any parent missing with [`DIR_MODE`] whatever the umask (a
/// directory that exists is left as it is).
pub(crate) fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Takes group and other access off the file or directory at `path` if it has them (made by
/// an older worker under the usual umask, or changed by hand), said at WARN with its old mode
/// (`what` says what it holds). Tightened rather than only warned of: an upgrade would
/// otherwise leave every existing state directory readable until someone acts on a log line.
/// A symlink is not followed (the worker never makes one there); one that cannot be changed
/// (another owner) is warned of and left: the open that follows says what is wrong with it.
pub(crate) fn tighten(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    let (private, kind) = match () {
        () if meta.is_file() => (FILE_MODE, "file"),
        () if meta.is_dir() => (DIR_MODE, "directory"),
        () => return,
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return;
    }
    let now = (mode & !0o077) | private;
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(now)) {
        Ok(()) => {
            tracing::warn!(path = %path.display(), was = format!("{mode:o}"), now = format!("{now:o}"), "a {kind} of the worker's was open to other users (it holds {what}); made private to this user");
        }
        Err(error) => {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), %error, "a {kind} of the worker's is open to other users (it holds {what}) and cannot be made private: chmod {private:o} it");
        }
    }
}
