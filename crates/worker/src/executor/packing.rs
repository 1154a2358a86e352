//! Packing of a checkpoint directory into one blob, and back.
//!
//! A command task writes its state as files in a directory; the worker ships that directory
//! as one checkpoint blob and restores it before a later attempt starts.
//!
//! Format `tether-dir-v2` (written) is binary: the line `tether-dir-v2\n`, then for each file
//! a little-endian `u32` path length, the path, a little-endian `u32` of its permission bits
//! (`0o755` for a script: restored on unpack), a little-endian `u64` content length and the
//! content, in path order. Format `tether-dir-v1` (read, for checkpoints packed by older
//! workers) is one JSON object whose contents are base64, a third larger:
//!
//! ```json
//! {"format": "tether-dir-v1", "files": {"rel/path": "<base64 of the content>"}}
//! ```
//!
//! - Only regular files travel, with their permission bits. Symlinks, sockets and the like are
//!   skipped, never followed, so a pack holds only bytes that live inside the directory. Empty
//!   directories are not kept, nor files whose names are not UTF-8 (skipped, said in the log).
//! - Paths are relative, `/`-separated and UTF-8; on unpack every component must be a plain
//!   name (no empty, `.` or `..` component, no leading `/`), so a pack cannot write outside
//!   its directory.
//! - A pack is at most [`MAX_PACK_BYTES`] long (the coordinator's default checkpoint limit:
//!   files and their 16 bytes and path each) and holds at most [`MAX_FILES`] files; both ends
//!   refuse more with an error instead of growing without bound.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

/// The format written.
pub const FORMAT: &str = "tether-dir-v2";
/// The first bytes of a pack of [`FORMAT`].
const MAGIC: &[u8] = b"tether-dir-v2\n";
/// The JSON format of older workers, still read.
const FORMAT_V1: &str = "tether-dir-v1";
/// Most bytes one pack may be: the coordinator's default `max_checkpoint_bytes`.
pub const MAX_PACK_BYTES: u64 = 64 * 1024 * 1024;
/// Most files one pack may hold.
pub const MAX_FILES: usize = 10_000;

/// Why a directory could not be packed or a pack not unpacked.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("checkpoint directory packs to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("checkpoint holds more than {MAX_FILES} files")]
    TooManyFiles,
    #[error("file name {} is not UTF-8", .0.display())]
    NonUtf8Name(PathBuf),
    #[error("not a checkpoint pack: {0}")]
    BadFormat(String),
    #[error("unsafe path {0:?} in checkpoint (must be relative, without `.` or `..`)")]
    UnsafePath(String),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PackError {
    move |source| PackError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A pack of format `tether-dir-v1`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PackV1 {
    format: String,
    #[serde(deserialize_with = "at_most_max_files")]
    files: BTreeMap<String, String>,
}

/// A v1 pack's files, refused as soon as there are more than [`MAX_FILES`]: a pack from the
/// coordinator is another worker's, and millions of tiny entries would otherwise all be read
/// into the map before they were counted.
fn at_most_max_files<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    struct Files;
    impl<'de> serde::de::Visitor<'de> for Files {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a map of at most {MAX_FILES} files")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut files = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                if files.len() == MAX_FILES {
                    return Err(serde::de::Error::custom(format!(
                        "checkpoint holds more than {MAX_FILES} files"
                    )));
                }
                files.insert(k, v);
            }
            Ok(files)
        }
    }
    d.deserialize_map(Files)
}

/// What a directory's files look like from outside: relative path, size, mtime, ctime and
/// inode of every regular file. Two equal signatures mean "nothing to ship". The ctime and
/// inode catch what size and mtime miss: a tool that keeps mtimes (`cp -p`, `tar x`, `touch
/// -d`), or two writes of one size within a timestamp's tick (ctime cannot be set back).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signature(BTreeMap<String, Stamp>);

/// One file's part of a [`Signature`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
    inode: u64,
}

/// The signature of `dir`; a missing directory has the empty signature.
pub fn signature(dir: &Path) -> Result<Signature, PackError> {
    let files = walk(dir)?;
    Ok(Signature(
        files.into_iter().map(|(rel, f)| (rel, f.stamp)).collect(),
    ))
}

/// Packs the regular files under `dir`.
pub fn pack(dir: &Path) -> Result<Vec<u8>, PackError> {
    pack_limited(dir, MAX_PACK_BYTES)
}

/// The bytes a file's entry takes besides its content: its lengths, its mode and its path.
fn entry_overhead(rel: &str) -> u64 {
    4 + rel.len() as u64 + 4 + 8
}

/// One file of a pack: its permission bits (none in a `tether-dir-v1` pack) and its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    pub mode: Option<u32>,
    pub content: Vec<u8>,
}

fn pack_limited(dir: &Path, limit: u64) -> Result<Vec<u8>, PackError> {
    let (files, unnamed) = walk_counting(dir)?;
    if unnamed > 0 {
        tracing::warn!(dir = %dir.display(), files = unnamed, "files whose names are not UTF-8 are left out of the checkpoint");
    }
    let too_large = PackError::TooLarge { limit };
    let listed = files.iter().fold(MAGIC.len() as u64, |n, (rel, f)| {
        n.saturating_add(entry_overhead(rel)).saturating_add(f.len)
    });
    if listed > limit {
        return Err(too_large);
    }
    let mut out = Vec::with_capacity(usize::try_from(listed).unwrap_or(0));
    out.extend_from_slice(MAGIC);
    for (rel, f) in files {
        let mut file = match fs::File::open(&f.path) {
            Ok(file) => file,
            // The task deleted it between listing and reading: it is simply not in this pack.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("read", &f.path)(e)),
        };
        let path_len = u32::try_from(rel.len()).map_err(|_| PackError::UnsafePath(rel.clone()))?;
        out.extend_from_slice(&path_len.to_le_bytes());
        out.extend_from_slice(rel.as_bytes());
        out.extend_from_slice(&f.mode.to_le_bytes());
        let len_at = out.len();
        out.extend_from_slice(&0u64.to_le_bytes());
        // A file may grow while we read it; never read past the limit.
        let room = limit.saturating_sub(out.len() as u64);
        let n = (&mut file)
            .take(room + 1)
            .read_to_end(&mut out)
            .map_err(io_err("read", &f.path))?;
        if n as u64 > room {
            return Err(too_large);
        }
        out[len_at..len_at + 8].copy_from_slice(&(n as u64).to_le_bytes());
    }
    Ok(out)
}

/// Decodes a pack into relative paths and contents, checking format, paths and limits.
pub fn decode(data: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, PackError> {
    Ok(decode_files(data)?
        .into_iter()
        .map(|(rel, f)| (rel, f.content))
        .collect())
}

/// Decodes a pack into relative paths and files (modes and contents).
pub fn decode_files(data: &[u8]) -> Result<BTreeMap<String, Packed>, PackError> {
    decode_limited(data, MAX_PACK_BYTES)
}

fn decode_limited(data: &[u8], limit: u64) -> Result<BTreeMap<String, Packed>, PackError> {
    let files = match data.strip_prefix(MAGIC) {
        Some(entries) => {
            if data.len() as u64 > limit {
                return Err(PackError::TooLarge { limit });
            }
            decode_entries(entries)?
        }
        None => decode_v1(data, limit)?,
    };
    if files.len() > MAX_FILES {
        return Err(PackError::TooManyFiles);
    }
    if let Some(rel) = files.keys().find(|rel| !is_safe_relative(rel)) {
        return Err(PackError::UnsafePath(rel.clone()));
    }
    Ok(files)
}

/// The entries of a `tether-dir-v2` pack, after its magic.
fn decode_entries(mut rest: &[u8]) -> Result<BTreeMap<String, Packed>, PackError> {
    let bad = |what: &str| PackError::BadFormat(format!("{FORMAT}: {what}"));
    let take = |n: u64, rest: &mut &[u8]| -> Result<Vec<u8>, PackError> {
        let n = usize::try_from(n).map_err(|_| bad("a length past the end"))?;
        if rest.len() < n {
            return Err(bad("a length past the end"));
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Ok(head.to_vec())
    };
    let mut files = BTreeMap::new();
    while !rest.is_empty() {
        if files.len() == MAX_FILES {
            return Err(PackError::TooManyFiles);
        }
        let path_len = take(4, &mut rest)?;
        let path_len = u32::from_le_bytes(path_len.try_into().map_err(|_| bad("a short entry"))?);
        let path = String::from_utf8(take(u64::from(path_len), &mut rest)?)
            .map_err(|_| bad("a path that is not UTF-8"))?;
        let mode = take(4, &mut rest)?;
        let mode = u32::from_le_bytes(mode.try_into().map_err(|_| bad("a short entry"))?);
        let len = take(8, &mut rest)?;
        let len = u64::from_le_bytes(len.try_into().map_err(|_| bad("a short entry"))?);
        let content = take(len, &mut rest)?;
        let file = Packed {
            mode: Some(mode),
            content,
        };
        if files.insert(path.clone(), file).is_some() {
            return Err(bad(&format!("{path:?} twice")));
        }
    }
    Ok(files)
}

/// The files of a `tether-dir-v1` pack, with at most `limit` bytes of content.
fn decode_v1(data: &[u8], limit: u64) -> Result<BTreeMap<String, Packed>, PackError> {
    // Base64 is 4 bytes for 3, and the JSON around it far less than the files' content: a
    // larger pack holds more than `limit` bytes of content, and is not read.
    if data.len() as u64 > limit.saturating_mul(2).saturating_add(1 << 20) {
        return Err(PackError::TooLarge { limit });
    }
    let pack: PackV1 =
        serde_json::from_slice(data).map_err(|e| PackError::BadFormat(e.to_string()))?;
    if pack.format != FORMAT_V1 {
        return Err(PackError::BadFormat(format!("format is {:?}", pack.format)));
    }
    if pack.files.len() > MAX_FILES {
        return Err(PackError::TooManyFiles);
    }
    let mut out = BTreeMap::new();
    let mut total: u64 = 0;
    for (rel, b64) in pack.files {
        let content = BASE64
            .decode(b64.as_bytes())
            .map_err(|e| PackError::BadFormat(format!("{rel}: {e}")))?;
        total = total.saturating_add(content.len() as u64);
        if total > limit {
            return Err(PackError::TooLarge { limit });
        }
        out.insert(
            rel,
            Packed {
                mode: None,
                content,
            },
        );
    }
    Ok(out)
}

/// Replaces the contents of `dir` (created if missing) with the files of a pack. The whole pack
/// is checked before anything in `dir` is touched, so a refused pack leaves `dir` as it was.
pub fn unpack(data: &[u8], dir: &Path) -> Result<(), PackError> {
    use std::os::unix::fs::PermissionsExt;
    let files = decode_files(data)?;
    clear_dir(dir)?;
    for (rel, file) in files {
        let path = dir.join(&rel);
        if let Some(parent) = path.parent() {
            crate::statedir::create_private_dir(parent).map_err(io_err("create", parent))?;
        }
        write_private(&path, &file.content).map_err(io_err("write", &path))?;
        // A mode the pack carries is the task's own (its script's execute bit, a file it
        // opened to others on the worker that packed it): kept, in a directory no other user
        // can enter.
        if let Some(mode) = file.mode {
            // Permission bits only: no setuid, setgid or sticky bit comes from another worker.
            fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o777))
                .map_err(io_err("set the mode of", &path))?;
        }
    }
    Ok(())
}

/// Whether `rel` is a `/`-separated path of plain names that stays inside its directory.
fn is_safe_relative(rel: &str) -> bool {
    !rel.is_empty()
        && rel
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
}

/// Creates `dir` if needed and removes everything in it. Symlinks are removed, not followed;
/// `dir` itself, found a symlink or a file (a task may replace its directory), is replaced by
/// a directory. A directory a task made read-only (`chmod 555`, its right: it runs as the
/// worker's user) is made writable first ([`remove_tree`]), or only root could clear it.
pub(crate) fn clear_dir(dir: &Path) -> Result<(), PackError> {
    match fs::symlink_metadata(dir) {
        Ok(meta) if !meta.is_dir() => fs::remove_file(dir).map_err(io_err("remove", dir))?,
        _ => {}
    }
    crate::statedir::create_private_dir(dir).map_err(io_err("create", dir))?;
    open_private(dir);
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .map_err(io_err("inspect", &path))?
            .is_dir();
        if is_dir {
            remove_tree(&path).map_err(io_err("remove", &path))?;
        } else {
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
        }
    }
    Ok(())
}

/// Removes the directory `dir` and everything in it, as [`fs::remove_dir_all`] does (which
/// removes a symlink, never follows one), after making each directory in it writable and
/// searchable by its owner: a task's processes run as the worker's user and may leave a
/// directory of mode 0555 behind, whose entries then only root could remove. Only
/// directories inside `dir` are changed, each opened without following a symlink; one that
/// cannot be changed (not the worker's) is left to the removal to report. Not found is done.
pub(crate) fn remove_tree(dir: &Path) -> io::Result<()> {
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        if !open_writable(&path) {
            continue;
        }
        let Ok(entries) = fs::read_dir(&path) else {
            continue;
        };
        // `file_type` of an entry is its own (lstat): a symlink to a directory is not entered.
        pending.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Writes `content` to a new file at `path`, its user's alone whatever the umask (the
/// directory is cleared first: no file is there).
fn write_private(path: &Path, content: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::statedir::FILE_MODE)
        .open(path)?
        .write_all(content)
}

/// Makes the checkpoint directory at `path` its user's alone (0700) if it was open to others:
/// made by an older worker with the umask's mode, or by the task (`chmod`), whose files a
/// restored checkpoint puts back in it. Opened without following a symlink, as
/// [`open_writable`] does; one that cannot be changed is left to the writes to report.
fn open_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Some(file) = open_dir_nofollow(path) else {
        return;
    };
    let Ok(meta) = file.metadata() else { return };
    let private = crate::statedir::DIR_MODE;
    if meta.mode() & 0o777 != private {
        let _ = file.set_permissions(fs::Permissions::from_mode(private));
    }
}

/// Gives the directory at `path` its owner's read, write and search bits, opening it without
/// following a symlink (`O_NOFOLLOW`): a symlink's target, anywhere, is never changed. Whether
/// it is a directory that now has them.
fn open_writable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    const OWNER_RWX: u32 = 0o700;
    let Some(file) = open_dir_nofollow(path) else {
        return false;
    };
    let Ok(meta) = file.metadata() else {
        return false;
    };
    let mode = meta.mode();
    if mode & OWNER_RWX == OWNER_RWX {
        return true;
    }
    // fchmod, on the directory opened: not a path another process could swap meanwhile.
    file.set_permissions(fs::Permissions::from_mode((mode | OWNER_RWX) & 0o7777))
        .is_ok()
}

/// The directory at `path`, opened without following a symlink (`O_NOFOLLOW`, `O_DIRECTORY`):
/// what is changed through it is that directory, never a link's target. `None` if it is not
/// one, or cannot be opened.
fn open_dir_nofollow(path: &Path) -> Option<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_DIRECTORY)
        .open(path)
        .ok()
}

struct FileInfo {
    path: PathBuf,
    len: u64,
    /// Permission bits.
    mode: u32,
    stamp: Stamp,
}

/// The regular files under `dir` by relative path. Entries that vanish while we look are
/// skipped: the task may be rewriting its files right now.
fn walk(dir: &Path) -> Result<BTreeMap<String, FileInfo>, PackError> {
    walk_counting(dir).map(|(files, _)| files)
}

/// [`walk`], and how many files it left out for names that are not UTF-8.
fn walk_counting(dir: &Path) -> Result<(BTreeMap<String, FileInfo>, usize), PackError> {
    let mut files = BTreeMap::new();
    let mut unnamed = 0;
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, prefix)) = pending.pop() {
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("list", &path)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("list", &path))?;
            let child = entry.path();
            let name = entry.file_name();
            // Left out, not the whole checkpoint lost: a pack names its files in UTF-8.
            let Some(name) = name.to_str() else {
                unnamed += 1;
                continue;
            };
            let rel = format!("{prefix}{name}");
            // symlink_metadata: a symlink is reported as itself, never followed.
            let meta = match fs::symlink_metadata(&child) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("inspect", &child)(e)),
            };
            if meta.is_dir() {
                pending.push((child, format!("{rel}/")));
            } else if meta.is_file() {
                if files.len() == MAX_FILES {
                    return Err(PackError::TooManyFiles);
                }
                let info = FileInfo {
                    path: child,
                    len: meta.len(),
                    mode: meta.mode() & 0o7777,
                    stamp: Stamp {
                        len: meta.len(),
                        modified: meta.modified().ok(),
                        changed: (meta.ctime(), meta.ctime_nsec()),
                        inode: meta.ino(),
                    },
                };
                files.insert(rel, info);
            }
        }
    }
    Ok((files, unnamed))
}

#[cfg(test)]
mod tests {
    use tether_proto::file_modes::mode;

    use super::*;

    fn write(dir: &Path, rel: &str, content: &[u8]) {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, content).expect("write");
    }

    /// Runs `f` on a thread of its own whose effective capabilities are dropped (`capset` is
    /// per thread): as root, as CI runs the tests, the thread meets a file's mode as any
    /// other user does, where root's `CAP_DAC_OVERRIDE` would let it write in a directory of
    /// mode 0555. Its files stay its own (the same uid), so it may still change their modes.
    fn without_capabilities<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut header = Header {
                        version: VERSION_3,
                        pid: 0,
                    };
                    let mut data = [Data::default(); 2];
                    // SAFETY: `header` and two `Data` are what capget and capset read and
                    // write for version 3, and both outlive the calls.
                    let got = unsafe {
                        nix::libc::syscall(nix::libc::SYS_capget, &mut header, data.as_mut_ptr())
                    };
                    assert_eq!(got, 0, "capget: {}", io::Error::last_os_error());
                    for d in &mut data {
                        d.effective = 0;
                    }
                    // SAFETY: as above.
                    let set = unsafe {
                        nix::libc::syscall(nix::libc::SYS_capset, &mut header, data.as_ptr())
                    };
                    assert_eq!(set, 0, "capset: {}", io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("the thread without capabilities")
        })
    }

    /// A task runs as the worker's user and may leave read-only directories (mode 0555, its
    /// checkpoint directory itself among them) in its checkpoint directory: clearing it for
    /// the next attempt makes them writable and removes them, instead of failing that
    /// attempt "Permission denied". Run without root's power to ignore modes, as a worker of
    /// another user runs. A symlink in it is removed, its target (elsewhere) left as it was.
    #[test]
    fn clearing_a_task_dir_removes_the_read_only_directories_it_left() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("task");
        let outside = root.path().join("outside");
        write(&dir, "ro/sub/state", b"1");
        write(&dir, "ro/other", b"2");
        write(&dir, "top", b"3");
        write(&outside, "keep", b"4");
        std::os::unix::fs::symlink(&outside, dir.join("ro/link")).expect("symlink");
        let read_only =
            |p: &Path| fs::set_permissions(p, fs::Permissions::from_mode(0o555)).expect("chmod");
        read_only(&outside);
        read_only(&dir.join("ro/sub"));
        read_only(&dir.join("ro"));
        read_only(&dir);

        without_capabilities(|| clear_dir(&dir)).expect("cleared");
        let left: Vec<_> = fs::read_dir(&dir).expect("list").flatten().collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(mode(&dir) & 0o700, 0o700, "the directory is writable again");
        assert_eq!(mode(&outside), 0o555, "a symlink's target is not changed");
        assert!(
            outside.join("keep").exists(),
            "nor is anything in it removed"
        );

        // The next attempt's checkpoint unpacks into it.
        let pack = pack_v2(&[("ro/sub/state", "5")]);
        without_capabilities(|| unpack(&pack, &dir)).expect("unpacked");
        assert_eq!(fs::read(dir.join("ro/sub/state")).expect("read"), b"5");
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// A task that replaced its checkpoint directory with a symlink gets a directory again:
    /// clearing it neither follows the link nor empties its target.
    #[test]
    fn a_task_dir_replaced_by_a_symlink_is_cleared_without_following_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("task");
        let elsewhere = root.path().join("elsewhere");
        write(&elsewhere, "precious", b"1");
        std::os::unix::fs::symlink(&elsewhere, &dir).expect("symlink");
        clear_dir(&dir).expect("cleared");
        assert!(fs::symlink_metadata(&dir).expect("stat").is_dir());
        assert!(elsewhere.join("precious").exists());
    }

    /// Removing a finished task's directory removes read-only directories in it too.
    #[test]
    fn removing_a_task_dir_removes_the_read_only_directories_in_it() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("task");
        write(&dir, "a/b/c", b"1");
        for p in [dir.join("a/b"), dir.join("a"), dir.clone()] {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o500)).expect("chmod");
        }
        without_capabilities(|| remove_tree(&dir)).expect("removed");
        assert!(!dir.exists());
        assert!(remove_tree(&dir).is_ok(), "gone already is done");
    }

    /// A `tether-dir-v1` pack of `files`, as older workers wrote.
    fn pack_v1(files: &[(&str, &str)]) -> Vec<u8> {
        let files = files
            .iter()
            .map(|(p, c)| ((*p).to_owned(), BASE64.encode(c)))
            .collect();
        serde_json::to_vec(&PackV1 {
            format: FORMAT_V1.to_owned(),
            files,
        })
        .expect("json")
    }

    /// A `tether-dir-v2` pack of `files`, in the order given.
    fn pack_v2(files: &[(&str, &str)]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for (p, c) in files {
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(p.as_bytes());
            out.extend_from_slice(&0o644u32.to_le_bytes());
            out.extend_from_slice(&(c.len() as u64).to_le_bytes());
            out.extend_from_slice(c.as_bytes());
        }
        out
    }

    #[test]
    fn a_packed_dir_unpacks_to_the_same_regular_files() {
        let src = tempfile::tempdir().expect("tempdir");
        write(src.path(), "state.txt", b"42\n");
        write(src.path(), "deep/er/data.bin", &[0, 1, 2, 255]);
        fs::create_dir(src.path().join("empty")).expect("mkdir");
        std::os::unix::fs::symlink("/etc/hostname", src.path().join("link")).expect("symlink");

        let packed = pack(src.path()).expect("pack");
        let files = decode(&packed).expect("decode");
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(names, ["deep/er/data.bin", "state.txt"]);

        let dst = tempfile::tempdir().expect("tempdir");
        write(dst.path(), "stale/old.txt", b"old");
        unpack(&packed, dst.path()).expect("unpack");
        assert_eq!(
            fs::read(dst.path().join("state.txt")).expect("read"),
            b"42\n"
        );
        assert_eq!(
            fs::read(dst.path().join("deep/er/data.bin")).expect("read"),
            [0, 1, 2, 255]
        );
        assert!(
            !dst.path().join("stale").exists(),
            "unpack clears the dir first"
        );
    }

    /// A pack comes from another worker: an old-format one with more than [`MAX_FILES`] files
    /// is refused (counted as it is read: the map is never built whole), and one larger than
    /// twice its content limit is not read at all, whatever its content: megabytes of names
    /// around empty files were parsed into memory before anything was counted.
    #[test]
    fn an_old_format_pack_past_the_bounds_is_refused() {
        let names: Vec<String> = (0..=MAX_FILES).map(|i| format!("f{i}")).collect();
        let files: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "")).collect();
        let e = decode(&pack_v1(&files)).expect_err("too many files");
        assert!(e.to_string().contains("more than 10000 files"), "{e}");
        let long: Vec<String> = (0..100)
            .map(|i| format!("{i}{}", "n".repeat(12_000)))
            .collect();
        let files: Vec<(&str, &str)> = long.iter().map(|n| (n.as_str(), "")).collect();
        assert!(matches!(
            decode_limited(&pack_v1(&files), 1),
            Err(PackError::TooLarge { .. })
        ));
    }

    /// The bits a file keeps from a pack are its permissions: no setuid, setgid or sticky bit
    /// comes from another worker.
    #[test]
    fn unpacked_files_keep_their_permissions_and_no_set_id_bit() {
        use std::os::unix::fs::PermissionsExt;
        let mut pack = MAGIC.to_vec();
        let (path, content) = ("run.sh", "true");
        pack.extend_from_slice(&(path.len() as u32).to_le_bytes());
        pack.extend_from_slice(path.as_bytes());
        pack.extend_from_slice(&0o6755u32.to_le_bytes());
        pack.extend_from_slice(&(content.len() as u64).to_le_bytes());
        pack.extend_from_slice(content.as_bytes());
        let dir = tempfile::tempdir().expect("tempdir");
        unpack(&pack, dir.path()).expect("unpack");
        let mode = fs::metadata(dir.path().join(path))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
    }

    #[test]
    fn unpack_refuses_paths_that_leave_the_dir_and_touches_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target");
        write(&target, "keep.txt", b"keep");
        for bad in ["../x", "/etc/x", "a/../../x", "a//b", "./x", "a/.", ""] {
            for pack in [pack_v1, pack_v2] {
                let r = unpack(&pack(&[("ok.txt", "fine"), (bad, "evil")]), &target);
                assert!(
                    matches!(&r, Err(PackError::UnsafePath(p)) if p == bad),
                    "{bad:?}: {r:?}"
                );
            }
        }
        assert!(!dir.path().join("x").exists());
        assert_eq!(fs::read(target.join("keep.txt")).expect("read"), b"keep");
        assert!(!target.join("ok.txt").exists());
    }

    #[test]
    fn unpack_refuses_other_formats_and_bad_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = br#"{"format":"tar","files":{}}"#;
        assert!(matches!(
            unpack(other, dir.path()),
            Err(PackError::BadFormat(_))
        ));
        assert!(matches!(
            unpack(b"7", dir.path()),
            Err(PackError::BadFormat(_))
        ));
        let bad_b64 = br#"{"format":"tether-dir-v1","files":{"a":"!!"}}"#;
        assert!(matches!(
            unpack(bad_b64, dir.path()),
            Err(PackError::BadFormat(_))
        ));
        // A binary pack cut anywhere inside an entry, or naming a file twice.
        let whole = pack_v2(&[("a", "one"), ("b", "two")]);
        for cut in MAGIC.len() + 1..whole.len() {
            if cut == MAGIC.len() + 4 + 1 + 4 + 8 + 3 {
                continue; // between the two entries: a whole pack of "a"
            }
            let r = decode(&whole[..cut]);
            assert!(
                matches!(r, Err(PackError::BadFormat(_))),
                "cut at {cut}: {r:?}"
            );
        }
        let twice = pack_v2(&[("a", "one"), ("a", "two")]);
        assert!(matches!(decode(&twice), Err(PackError::BadFormat(_))));
    }

    /// A pack is its files and 16 bytes and a path each, not a third more (base64, as the
    /// first format was); and a pack an older worker wrote still restores.
    #[test]
    fn a_pack_is_about_as_large_as_its_files_and_an_older_workers_pack_still_unpacks() {
        let src = tempfile::tempdir().expect("tempdir");
        let content: Vec<u8> = (0..3 * 1024 * 1024u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        write(src.path(), "blob", &content);
        write(src.path(), "n", b"13\n");
        let packed = pack(src.path()).expect("pack");
        let files = 3 * 1024 * 1024 + 3;
        assert_eq!(
            packed.len(),
            MAGIC.len() + files + 2 * 16 + "blob".len() + "n".len()
        );
        assert_eq!(decode(&packed).expect("decode")["blob"], content);
        let dst = tempfile::tempdir().expect("tempdir");
        unpack(&pack_v1(&[("n", "12\n"), ("d/e", "x")]), dst.path()).expect("a v1 pack");
        assert_eq!(fs::read(dst.path().join("n")).expect("read"), b"12\n");
        assert_eq!(fs::read(dst.path().join("d/e")).expect("read"), b"x");
    }

    #[test]
    fn pack_and_decode_refuse_more_than_the_size_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a", &[7; 600]);
        write(dir.path(), "b", &[7; 600]);
        // The magic, and 16 bytes, a one-letter path and 600 bytes a file.
        let whole = (MAGIC.len() + 2 * (16 + 1 + 600)) as u64;
        assert_eq!(
            pack_limited(dir.path(), whole).expect("fits").len() as u64,
            whole
        );
        assert!(matches!(
            pack_limited(dir.path(), whole - 1),
            Err(PackError::TooLarge { .. })
        ));
        let packed = pack(dir.path()).expect("pack");
        assert!(matches!(
            decode_limited(&packed, 1000),
            Err(PackError::TooLarge { .. })
        ));
    }

    /// A file's permission bits travel (a script stays executable, a secret stays private);
    /// a file whose name is not UTF-8 is left out, the others packed.
    #[test]
    fn modes_travel_and_a_name_that_is_not_utf8_is_left_out_alone() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::PermissionsExt;
        let src = tempfile::tempdir().expect("tempdir");
        write(src.path(), "run.sh", b"#!/bin/sh\necho hi\n");
        write(src.path(), "secret", b"s");
        fs::set_permissions(src.path().join("run.sh"), fs::Permissions::from_mode(0o755))
            .expect("chmod");
        fs::set_permissions(src.path().join("secret"), fs::Permissions::from_mode(0o600))
            .expect("chmod");
        let odd = std::ffi::OsStr::from_bytes(b"bad\xffname");
        fs::write(src.path().join(odd), b"x").expect("write");
        let packed = pack(src.path()).expect("pack");
        let dst = tempfile::tempdir().expect("tempdir");
        unpack(&packed, dst.path()).expect("unpack");
        let mode = |name: &str| {
            fs::metadata(dst.path().join(name))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!((mode("run.sh"), mode("secret")), (0o755, 0o600));
        let names: Vec<String> = fs::read_dir(dst.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn the_signature_changes_when_a_file_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            signature(&dir.path().join("missing")).expect("sig"),
            Signature::default()
        );
        write(dir.path(), "a", b"1");
        let first = signature(dir.path()).expect("sig");
        assert_eq!(signature(dir.path()).expect("sig"), first);
        write(dir.path(), "a", b"12");
        assert_ne!(signature(dir.path()).expect("sig"), first);
        // The same size and the mtime set back (`cp -p`, `touch -d`): the ctime tells. (The
        // kernel's clock for it ticks every few ms: the rewrite comes after a tick.)
        let path = dir.path().join("a");
        let before = signature(dir.path()).expect("sig");
        let mtime = fs::metadata(&path)
            .expect("meta")
            .modified()
            .expect("mtime");
        std::thread::sleep(std::time::Duration::from_millis(30));
        write(dir.path(), "a", b"34");
        let file = fs::File::options().write(true).open(&path).expect("open");
        file.set_modified(mtime).expect("set mtime");
        assert_eq!(
            fs::metadata(&path)
                .expect("meta")
                .modified()
                .expect("mtime"),
            mtime
        );
        assert_ne!(signature(dir.path()).expect("sig"), before);
    }
}
