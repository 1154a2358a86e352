//! The store's files are its user's alone whatever the umask: task specs (their `env` often
//! carries credentials) and output must not be readable by other local users, even in a data
//! directory made open to them.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;

use tether_proto::file_modes::{Umask, mode, modes};

use super::*;

#[test]
fn every_file_the_store_makes_is_its_users_alone_under_the_usual_umask() {
    let _umask = Umask::usual();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("made/data");
    let _lock = lock_dir(&data).expect("lock");
    let mut j = Journaled::open(&data);
    j.commit(vec![new_task("a"), state_mut("a", 1)]);
    j.commit(vec![result_mut("a", 1)]);
    let found = modes(&dir.path().join("made"));
    let names: BTreeSet<String> = found
        .iter()
        .filter_map(|(p, _)| Some(p.file_name()?.to_str()?.to_owned()))
        .collect();
    // Every kind of file the store makes is there to be looked at.
    for made in [DB_FILE, "tether.db-wal", "tether.db-shm", LOCK_FILE, "data"] {
        assert!(names.contains(made), "{made} not made: {names:?}");
    }
    assert!(
        names.iter().any(|n| n.ends_with(".journal")),
        "no state journal: {names:?}"
    );
    for (path, m) in &found {
        let want = if path.is_dir() { 0o700 } else { FILE_MODE };
        assert_eq!(*m, want, "{} is {m:o}", path.display());
    }
}

/// A data directory an older version left (its files 0644, in a directory a package made
/// 0755) is closed at the next open: the database, its -wal and -shm and a state journal,
/// with the data kept. A file the store does not make is left as it is.
#[test]
fn files_an_older_version_left_open_to_others_are_made_private_at_open() {
    let _umask = Umask::usual();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("dir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    {
        let mut j = Journaled::open(&data);
        j.commit(vec![new_task("a"), state_mut("a", 1)]);
        // As a process that died: the journal and the -wal stay.
        std::mem::forget(j);
    }
    let theirs = data.join("notes.txt");
    std::fs::write(&theirs, "the operator's").expect("write");
    let open_to_others: Vec<PathBuf> = modes(&data).into_iter().map(|(p, _)| p).collect();
    for path in &open_to_others {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    assert!(
        open_to_others.iter().any(|p| p.ends_with("tether.db-wal"))
            && open_to_others
                .iter()
                .any(|p| p.to_string_lossy().ends_with(".journal")),
        "{open_to_others:?}"
    );
    let j = Journaled::open(&data);
    assert_eq!(j.state_n("a"), Some(1), "the data kept");
    for (path, m) in modes(&data) {
        let want = if path == theirs { 0o644 } else { FILE_MODE };
        assert_eq!(m, want, "{} is {m:o}", path.display());
    }
    assert_eq!(
        mode(&data),
        0o755,
        "a directory made by others is warned of, not changed"
    );
}
