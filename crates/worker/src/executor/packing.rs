//! Packing of a checkpoint directory into one blob, and back.
//!
//! A command task writes its state as files in a directory; the worker ships that directory
//! as one checkpoint blob and restores it before a later attempt starts.
//!
//! Format `tether-dir-v1` is one JSON object:
//!
//! ```json
//! {"format": "tether-dir-v1", "files": {"rel/path": "<base64 of the content>"}}
//! ```
//!
//! - Only regular files travel. Symlinks, sockets and the like are skipped, never followed, so
//!   a pack holds only bytes that live inside the directory. Empty directories are not kept.
//! - Paths are relative, `/`-separated and UTF-8; on unpack every component must be a plain
//!   name (no empty, `.` or `..` component, no leading `/`), so a pack cannot write outside
//!   its directory.
//! - A pack holds at most [`MAX_FILES`] files and [`MAX_TOTAL_BYTES`] bytes of content; both
//!   ends refuse more with an error instead of growing without bound.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

/// The `format` tag of a pack.
pub const FORMAT: &str = "tether-dir-v1";
/// Most bytes of file content one pack may hold.
pub const MAX_TOTAL_BYTES: u64 = 64 * 1024 * 1024;
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
    #[error("checkpoint holds more than {limit} bytes of files")]
    TooLarge { limit: u64 },
    #[error("checkpoint holds more than {MAX_FILES} files")]
    TooManyFiles,
    #[error("file name {} is not UTF-8", .0.display())]
    NonUtf8Name(PathBuf),
    #[error("not a {FORMAT} pack: {0}")]
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

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pack {
    format: String,
    files: BTreeMap<String, String>,
}

/// What a directory's files look like from outside: relative path, size and mtime of every
/// regular file. Two equal signatures mean "nothing to ship".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signature(BTreeMap<String, (u64, Option<SystemTime>)>);

/// The signature of `dir`; a missing directory has the empty signature.
pub fn signature(dir: &Path) -> Result<Signature, PackError> {
    let files = walk(dir)?;
    Ok(Signature(
        files
            .into_iter()
            .map(|(rel, f)| (rel, (f.len, f.modified)))
            .collect(),
    ))
}

/// Packs the regular files under `dir`.
pub fn pack(dir: &Path) -> Result<Vec<u8>, PackError> {
    pack_limited(dir, MAX_TOTAL_BYTES)
}

fn pack_limited(dir: &Path, limit: u64) -> Result<Vec<u8>, PackError> {
    let mut files = BTreeMap::new();
    let mut total: u64 = 0;
    for (rel, f) in walk(dir)? {
        if total.saturating_add(f.len) > limit {
            return Err(PackError::TooLarge { limit });
        }
        let mut content = Vec::new();
        let read = fs::File::open(&f.path).and_then(|file| {
            // A file may grow while we read it; never read past the limit.
            file.take(limit - total + 1).read_to_end(&mut content)
        });
        match read {
            Ok(n) => total += n as u64,
            // The task deleted it between listing and reading: it is simply not in this pack.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("read", &f.path)(e)),
        }
        if total > limit {
            return Err(PackError::TooLarge { limit });
        }
        files.insert(rel, BASE64.encode(&content));
    }
    let pack = Pack {
        format: FORMAT.to_owned(),
        files,
    };
    serde_json::to_vec(&pack).map_err(|e| PackError::BadFormat(e.to_string()))
}

/// Decodes a pack into relative paths and contents, checking format, paths and limits.
pub fn decode(data: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, PackError> {
    decode_limited(data, MAX_TOTAL_BYTES)
}

fn decode_limited(data: &[u8], limit: u64) -> Result<BTreeMap<String, Vec<u8>>, PackError> {
    let pack: Pack =
        serde_json::from_slice(data).map_err(|e| PackError::BadFormat(e.to_string()))?;
    if pack.format != FORMAT {
        return Err(PackError::BadFormat(format!("format is {:?}", pack.format)));
    }
    if pack.files.len() > MAX_FILES {
        return Err(PackError::TooManyFiles);
    }
    let mut out = BTreeMap::new();
    let mut total: u64 = 0;
    for (rel, b64) in pack.files {
        if !is_safe_relative(&rel) {
            return Err(PackError::UnsafePath(rel));
        }
        let content = BASE64
            .decode(b64.as_bytes())
            .map_err(|e| PackError::BadFormat(format!("{rel}: {e}")))?;
        total = total.saturating_add(content.len() as u64);
        if total > limit {
            return Err(PackError::TooLarge { limit });
        }
        out.insert(rel, content);
    }
    Ok(out)
}

/// Replaces the contents of `dir` (created if missing) with the files of a pack. The whole pack
/// is checked before anything in `dir` is touched, so a refused pack leaves `dir` as it was.
pub fn unpack(data: &[u8], dir: &Path) -> Result<(), PackError> {
    let files = decode(data)?;
    clear_dir(dir)?;
    for (rel, content) in files {
        let path = dir.join(&rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        fs::write(&path, content).map_err(io_err("write", &path))?;
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

/// Creates `dir` if needed and removes everything in it. Symlinks are removed, not followed.
pub(crate) fn clear_dir(dir: &Path) -> Result<(), PackError> {
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .map_err(io_err("inspect", &path))?
            .is_dir();
        if is_dir {
            fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
        } else {
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
        }
    }
    Ok(())
}

struct FileInfo {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

/// The regular files under `dir` by relative path. Entries that vanish while we look are
/// skipped: the task may be rewriting its files right now.
fn walk(dir: &Path) -> Result<BTreeMap<String, FileInfo>, PackError> {
    let mut files = BTreeMap::new();
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
            let name = name
                .to_str()
                .ok_or_else(|| PackError::NonUtf8Name(child.clone()))?;
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
                    modified: meta.modified().ok(),
                };
                files.insert(rel, info);
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, content: &[u8]) {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, content).expect("write");
    }

    fn pack_of(files: &[(&str, &str)]) -> Vec<u8> {
        let files = files
            .iter()
            .map(|(p, c)| ((*p).to_owned(), BASE64.encode(c)))
            .collect();
        serde_json::to_vec(&Pack {
            format: FORMAT.to_owned(),
            files,
        })
        .expect("json")
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

    #[test]
    fn unpack_refuses_paths_that_leave_the_dir_and_touches_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target");
        write(&target, "keep.txt", b"keep");
        for bad in ["../x", "/etc/x", "a/../../x", "a//b", "./x", "a/.", ""] {
            let r = unpack(&pack_of(&[("ok.txt", "fine"), (bad, "evil")]), &target);
            assert!(
                matches!(&r, Err(PackError::UnsafePath(p)) if p == bad),
                "{bad:?}: {r:?}"
            );
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
    }

    #[test]
    fn pack_and_decode_refuse_more_than_the_size_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a", &[7; 600]);
        write(dir.path(), "b", &[7; 600]);
        assert!(pack_limited(dir.path(), 1200).is_ok());
        assert!(matches!(
            pack_limited(dir.path(), 1000),
            Err(PackError::TooLarge { limit: 1000 })
        ));
        let packed = pack(dir.path()).expect("pack");
        assert!(matches!(
            decode_limited(&packed, 1000),
            Err(PackError::TooLarge { .. })
        ));
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
    }
}
