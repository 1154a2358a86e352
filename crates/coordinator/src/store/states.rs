//! Task states: appended to a journal file of their own, folded into `task_state` now and then.
//!
//! A worker's state updates are most of what a busy coordinator stores, and each one only
//! replaces the one before it. Appending them to SQLite (a row in a log table, folded and
//! deleted later) cost a B-tree insert, the WAL frames of the log's pages, their copy into the
//! database by the checkpointer, a read back and a delete per state: 28 % of the coordinator's
//! CPU under `message_flood` (docs/PERFORMANCE.md, eleventh round). Here a group commit's
//! states are one `write` to the journal, before the group's SQLite commit and so before its
//! acknowledgements; the writer also keeps each task's newest unfolded state in memory
//! ([`Unfolded`]), where reads find it. Now and then a round writes the newest state of every
//! task that has one into `task_state`, a bounded piece after each group, and once it is done
//! deletes the journal files the round covered. A round that cannot make its file or remove
//! those (no file descriptor to be had, say) is tried again a second later: the journal keeps
//! the states meanwhile, and the writer goes on.
//!
//! The journal is a sequence of files `states-<generation>.journal`; a round begins by moving
//! the appends to the next generation. A file is created whole: its header is written under a
//! temporary name (`.journal.tmp`), synced, renamed into place and the directory synced, so a
//! journal file always holds at least its header, whatever the durability and whatever a crash
//! interrupts (a temporary file left behind is removed at the next start, unread). Each file is
//! a magic header, then one frame per group:
//! its length, the CRC-32 of its payload, and the payload (the group's commit time, then its
//! records in order: a task's state, or a task's deletion, so that a deleted task's older
//! states are not brought back). Opening the database replays every journal file, oldest
//! first, into `task_state` (only for tasks that exist), then deletes them; so does a writer
//! that stops. A frame that is cut short, zeroed or fails its CRC (a write torn by a crash of
//! the machine: without `--durability machine` the journal is not synced) ends what is read of
//! that file, as a torn WAL frame ends SQLite's WAL, and is reported; a file with a wrong
//! header, a file shorter than its header (empty, say: its states were lost), a frame whose CRC
//! holds but whose records do not parse, or a damaged frame with a whole one after it behind
//! bytes that are not zeros (damage, which no crash makes) is refused as corrupt
//! ([`StoreError::CorruptJournal`]) before the database is opened for writing. (Coordinators
//! before schema version 5 created the file in place, so a crash could leave one shorter than
//! its header and holding no state: a data directory they left is read with that allowed; see
//! `schema::WHOLE_JOURNALS`.)

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tether_proto::TaskId;
use tether_proto::msg::StateJson;

use super::StoreError;
use crate::model::IdMap;

/// A round begins once this long has passed since the previous one began...
pub const FOLD_EVERY: Duration = Duration::from_secs(1);
/// ...or once the journal grew by this many bytes since (a flood's second at 200,000 states/s
/// of about 150 bytes each is 30 MB).
pub const FOLD_BYTES: u64 = 32 * 1024 * 1024;
/// States a piece writes into `task_state`: a piece holds up the commit behind it (the log's
/// pieces of 4,096 rows took 2-7 ms under a flood, pieces of 1,024 under 2 ms; an upsert costs
/// about as much as 16 deletes).
pub const PIECE_STATES: usize = 64;

const MAGIC: &[u8; 8] = b"TSJRNL01";
const FRAME_HEAD: usize = 8;
/// A frame longer than this is not one a writer made: a group's changes go in frames of at
/// most [`SPLIT_AT`] plus one op, and a state is at most a message frame
/// (`tether_proto::settings::MAX_FRAME`, 256 MiB).
const MAX_FRAME: u32 = 1 << 30;
/// A group's changes past this many bytes continue in another frame (a group is usually a few
/// MiB; large states could make one past what a reader takes).
const SPLIT_AT: usize = 256 * 1024 * 1024;
const KIND_STATE: u8 = 1;
const KIND_FORGET: u8 = 2;

/// One change to the states, in the order of its group.
#[derive(Debug, Clone, Copy)]
pub(super) enum Op<'a> {
    /// The task's newest state.
    State {
        task: &'a TaskId,
        attempt: u32,
        state: &'a StateJson,
    },
    /// The task was deleted: its states go with it.
    Forget(&'a TaskId),
}

/// A task's newest state not yet in `task_state`.
#[derive(Debug, Clone)]
struct Pending {
    /// Which change this is (a round removes only the one it wrote).
    version: u64,
    attempt: u32,
    /// The text the message carried (shared, not copied).
    state: StateJson,
    updated_at: Arc<str>,
}

/// The newest state of each task whose state is journaled but not yet folded into
/// `task_state`. Shared by the writer, which fills and folds it, and the API's reads.
#[derive(Debug, Default)]
pub struct Unfolded {
    map: Mutex<IdMap<TaskId, Pending>>,
}

impl Unfolded {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdMap<TaskId, Pending>> {
        // Every change under this lock is one map operation: a panic leaves it consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The task's newest unfolded state: (attempt, state, updated_at).
    pub fn get(&self, task: &TaskId) -> Option<(u32, String, String)> {
        self.lock().get(task).map(|p| {
            (
                p.attempt,
                p.state.get().to_owned(),
                p.updated_at.to_string(),
            )
        })
    }

    /// Tasks with an unfolded state.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The journal files of `dir`, oldest first, with their generations.
pub(super) fn journal_files(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(generation) = name
            .to_str()
            .and_then(|n| n.strip_prefix("states-"))
            .and_then(|n| n.strip_suffix(".journal"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            // A journal's name the coordinator never makes (one renamed by hand, a copy): not
            // replayed, and said, since its states would otherwise be dropped without a word.
            let looks_like = name
                .to_str()
                .is_some_and(|n| n.starts_with("states-") && n.ends_with(".journal"));
            if looks_like {
                tracing::warn!(file = %entry.path().display(), "a file named like a state journal but not states-<number>.journal: not replayed (rename it to be read)");
            }
            continue;
        };
        files.push((generation, entry.path()));
    }
    files.sort_unstable();
    Ok(files)
}

fn journal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("states-{generation}.journal"))
}

/// Where a journal file is made before it is renamed into place.
fn temporary_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("states-{generation}.journal.tmp"))
}

/// The temporary files of journal creations a crash cut short, in `dir`.
fn temporary_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let is_temporary = entry.file_name().to_str().is_some_and(|n| {
            n.strip_prefix("states-")
                .and_then(|n| n.strip_suffix(".journal.tmp"))
                .is_some_and(|g| g.parse::<u64>().is_ok())
        });
        if is_temporary {
            files.push(entry.path());
        }
    }
    Ok(files)
}

/// Makes a file's creation or removal in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes `paths` (one already gone is not an error), then, with `sync`, makes that durable.
fn remove_files(dir: &Path, paths: &[PathBuf], sync: bool) -> std::io::Result<()> {
    for path in paths {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    if sync && !paths.is_empty() {
        sync_dir(dir)?;
    }
    Ok(())
}

enum Reap {
    Files(Vec<PathBuf>),
    /// Answered once everything sent before is removed (tests).
    #[cfg(test)]
    Settle(std::sync::mpsc::Sender<()>),
}

/// Removes the journal files of finished rounds on a thread of its own. Removing a file of
/// tens of MiB frees its pages: 1-5 ms under a flood, which held up the commit behind a
/// round's last piece (docs/PERFORMANCE.md, thirteenth round). One thread removes them in
/// order, each round's removal durable (with `sync`) before the next's begins, so a file
/// that a crash of the machine brings back is never newer than one that stayed; replaying
/// it is harmless, since every state in it was folded or is superseded by a later file's.
/// A removal that fails is logged and tried again by the next round (the file is still
/// listed); dropping the reaper waits for what was sent.
#[derive(Debug)]
struct Reaper {
    tx: Option<std::sync::mpsc::Sender<Reap>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reaper {
    fn start(dir: &Path, sync: bool) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Reap>();
        let dir = dir.to_owned();
        let thread = std::thread::Builder::new()
            .name("tether-reaper".into())
            .spawn(move || {
                for reap in rx {
                    match reap {
                        Reap::Files(paths) => {
                            if let Err(e) = remove_files(&dir, &paths, sync) {
                                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a folded state journal; the next round tries again");
                            }
                        }
                        #[cfg(test)]
                        Reap::Settle(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(Reaper {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands `paths` over; `Err` with them when the thread is gone (the caller removes them).
    fn remove(&self, paths: Vec<PathBuf>) -> Result<(), Vec<PathBuf>> {
        match &self.tx {
            Some(tx) => tx.send(Reap::Files(paths)).map_err(|e| match e.0 {
                Reap::Files(paths) => paths,
                #[cfg(test)]
                Reap::Settle(_) => Vec::new(),
            }),
            None => Err(paths),
        }
    }

    /// Waits until everything handed over is removed.
    #[cfg(test)]
    fn settle(&self) {
        let (done, wait) = std::sync::mpsc::channel();
        if let Some(tx) = &self.tx
            && tx.send(Reap::Settle(done)).is_ok()
        {
            let _ = wait.recv();
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Encodes a group's changes as one frame.
/// `ops` in runs of at most `most` bytes of payload each (a run of one op may be larger).
fn frames_of<'o, 'a>(ops: &'o [Op<'a>], most: usize) -> impl Iterator<Item = &'o [Op<'a>]> {
    let size = |op: &Op<'_>| match *op {
        Op::State { task, state, .. } => 16 + task.as_str().len() + state.get().len(),
        Op::Forget(task) => 3 + task.as_str().len(),
    };
    let mut rest = ops;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (mut n, mut bytes) = (0, 0);
        while n < rest.len() && (n == 0 || bytes + size(&rest[n]) <= most) {
            bytes += size(&rest[n]);
            n += 1;
        }
        let (run, after) = rest.split_at(n);
        rest = after;
        Some(run)
    })
}

fn encode_frame(buf: &mut Vec<u8>, now: &str, ops: &[Op<'_>]) {
    buf.clear();
    buf.extend_from_slice(&[0; FRAME_HEAD]);
    put_str16(buf, now);
    for op in ops {
        match *op {
            Op::State {
                task,
                attempt,
                state,
            } => {
                buf.push(KIND_STATE);
                put_str16(buf, task.as_str());
                buf.extend_from_slice(&attempt.to_le_bytes());
                let state = state.get();
                buf.extend_from_slice(&(state.len() as u32).to_le_bytes());
                buf.extend_from_slice(state.as_bytes());
            }
            Op::Forget(task) => {
                buf.push(KIND_FORGET);
                put_str16(buf, task.as_str());
            }
        }
    }
    let len = (buf.len() - FRAME_HEAD) as u32;
    let crc = crc32fast::hash(&buf[FRAME_HEAD..]);
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf[4..FRAME_HEAD].copy_from_slice(&crc.to_le_bytes());
}

fn put_str16(buf: &mut Vec<u8>, s: &str) {
    // Task ids and timestamps are short (ids are bounded by the protocol).
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

/// A state read back from the journal: (attempt, state, updated_at).
type Replayed = (u32, String, String);

/// Reads a frame's payload into `into`, in order; `Err` names what does not parse.
fn decode_frame(payload: &[u8], into: &mut IdMap<String, Replayed>) -> Result<(), String> {
    let mut r = payload;
    let now = take_str16(&mut r).ok_or("commit time cut short")?;
    while let Some((&kind, rest)) = r.split_first() {
        r = rest;
        let task = take_str16(&mut r).ok_or("task id cut short")?;
        match kind {
            KIND_STATE => {
                let attempt = take_u32(&mut r).ok_or("attempt cut short")?;
                let len = take_u32(&mut r).ok_or("state length cut short")? as usize;
                if r.len() < len {
                    return Err("state cut short".into());
                }
                let (state, rest) = r.split_at(len);
                r = rest;
                let state = std::str::from_utf8(state).map_err(|e| format!("state: {e}"))?;
                into.insert(task.to_owned(), (attempt, state.to_owned(), now.to_owned()));
            }
            KIND_FORGET => {
                into.remove(task);
            }
            other => return Err(format!("unknown record kind {other}")),
        }
    }
    Ok(())
}

fn take_str16<'a>(r: &mut &'a [u8]) -> Option<&'a str> {
    let len = usize::from(u16::from_le_bytes(r.get(..2)?.try_into().ok()?));
    let s = std::str::from_utf8(r.get(2..2 + len)?).ok()?;
    *r = &r[2 + len..];
    Some(s)
}

fn take_u32(r: &mut &[u8]) -> Option<u32> {
    let v = u32::from_le_bytes(r.get(..4)?.try_into().ok()?);
    *r = &r[4..];
    Some(v)
}

/// What reading one journal file found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct FileRead {
    pub frames: usize,
    /// Bytes after the last whole frame (a write torn by a crash), not read.
    pub torn_bytes: u64,
}

/// Reads the journal file at `path` into `into` (the newest state of each task, in order).
/// With `whole` (the data directory's journals were created whole), a file shorter than its
/// header is corrupt; without, it is one an older coordinator created and crashed before its
/// header was written, and holds nothing.
fn read_file(
    path: &Path,
    into: &mut IdMap<String, Replayed>,
    whole: bool,
) -> Result<FileRead, StoreError> {
    let corrupt = |detail: String| StoreError::CorruptJournal {
        path: path.to_owned(),
        detail,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| StoreError::Access {
            path: path.to_owned(),
            source,
        })?;
    let mut read = FileRead::default();
    if bytes.len() < MAGIC.len() {
        if whole {
            let size = match bytes.len() {
                0 => "it is empty (0 bytes)".to_owned(),
                n => format!("it is {n} bytes long"),
            };
            return Err(corrupt(format!(
                "{size}, yet every journal file is created holding its {}-byte header: the \
                 task states it held were lost",
                MAGIC.len()
            )));
        }
        // Created in place by an older coordinator, which stopped before its header was written.
        read.torn_bytes = bytes.len() as u64;
        return Ok(read);
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt("not a tether state journal (bad header)".into()));
    }
    let mut at = MAGIC.len();
    while at < bytes.len() {
        let Some(payload) = whole_frame(&bytes, at) else {
            // A crash tears the last writes: what follows is cut short, or has whole pages of
            // zeros where the file system had not written them yet (pages go to disk out of
            // order; a hole falls on page boundaries, not frames). Damage elsewhere leaves
            // whole frames after it with no such page between: refused, not replayed in part.
            if let Some(next) = (at + 1..bytes.len()).find(|&p| whole_frame(&bytes, p).is_some())
                && !has_zero_page(&bytes[..next], at)
            {
                return Err(corrupt(format!(
                    "the frame at byte {at} is damaged and a whole frame follows at byte \
                     {next}: the file was damaged, not torn by a crash"
                )));
            }
            read.torn_bytes = (bytes.len() - at) as u64;
            break;
        };
        decode_frame(payload, into).map_err(|e| {
            corrupt(format!(
                "state journal frame at byte {at} holds a bad record: {e}"
            ))
        })?;
        read.frames += 1;
        at += FRAME_HEAD + payload.len();
    }
    Ok(read)
}

/// The size of the pages a file system writes back (the unit of a crash's holes).
const PAGE: usize = 4096;

/// Whether `bytes[from..]` holds a whole page-aligned page of zeros: the mark of pages a crash
/// left unwritten, which random damage does not make.
fn has_zero_page(bytes: &[u8], from: usize) -> bool {
    let first = from.next_multiple_of(PAGE);
    (first..bytes.len())
        .step_by(PAGE)
        .filter_map(|p| bytes.get(p..p + PAGE))
        .any(|page| page.iter().all(|&b| b == 0))
}

/// The payload of the whole frame that starts at byte `at` of `bytes`: its length in range and
/// not zero (every frame holds at least its commit time; a zeroed head is no frame), its
/// payload within the file, its CRC right.
fn whole_frame(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let head = bytes.get(at..at + FRAME_HEAD)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?);
    let crc = u32::from_le_bytes(head[4..].try_into().ok()?);
    if len == 0 || len > MAX_FRAME {
        return None;
    }
    let payload = bytes.get(at + FRAME_HEAD..at + FRAME_HEAD + len as usize)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

/// What the journal files of a data directory hold: read before the database is opened for
/// writing, so that a corrupt journal is refused with the database untouched.
#[derive(Debug, Default)]
pub(super) struct Journaled {
    files: Vec<PathBuf>,
    /// Temporary files of creations cut short: removed, never read.
    temporary: Vec<PathBuf>,
    /// The newest state of each task, by task id.
    latest: IdMap<String, Replayed>,
}

/// Reads every journal file in `dir`, oldest first; `whole` when the data directory's journal
/// files were all created whole (see [`read_file`]).
pub(super) fn read_journals(dir: &Path, whole: bool) -> Result<Journaled, StoreError> {
    let data_dir = |source| StoreError::DataDir {
        path: dir.to_owned(),
        source,
    };
    let files = journal_files(dir).map_err(data_dir)?;
    let mut out = Journaled {
        temporary: temporary_files(dir).map_err(data_dir)?,
        ..Journaled::default()
    };
    for (_, path) in files {
        let read = read_file(&path, &mut out.latest, whole)?;
        // Not only the newest file may end torn: with `process` durability no file is synced
        // before the next one takes the appends (nor is its removal), so a machine crash can
        // tear the file a round was covering, or bring back a removed one, as well. Refused as
        // damage, it would have the operator move it away, and every state in it with it.
        if read.torn_bytes > 0 {
            tracing::warn!(journal = %path.display(), frames = read.frames, torn_bytes = read.torn_bytes, "the state journal ends in a torn write (a crash of the machine); its last unsynced group is not replayed");
        }
        out.files.push(path);
    }
    Ok(out)
}

/// Folds what [`read_journals`] found into `task_state` (only for tasks that exist) in one
/// transaction, then deletes the files. Returns the states written.
///
/// Failing for want of space ([`StoreError::OutOfSpace`]: the transaction needs room), it
/// changed nothing (its transaction rolled back, the files kept), and is run again
/// (`super::open_until`). Run again after its commit (a crash before the files were removed),
/// it writes the same rows again, each a task's newest state whole: nothing is applied twice.
pub(super) fn replay(
    conn: &Connection,
    dir: &Path,
    journaled: &Journaled,
) -> Result<usize, StoreError> {
    let Journaled {
        files,
        temporary,
        latest,
    } = journaled;
    if files.is_empty() && temporary.is_empty() {
        return Ok(0);
    }
    let db = dir.join(super::DB_FILE);
    let io = |e: std::io::Error| StoreError::DataDir {
        path: dir.to_owned(),
        source: e,
    };
    let sql = |source| {
        super::space::or_out_of_space(conn, &db, source, |source| StoreError::Sql {
            path: db.clone(),
            source,
        })
    };
    // The journal files go once these rows are in: their commit must be on disk by then, at
    // any durability (a synchronous NORMAL commit in WAL mode is not synced, and a power loss
    // would take both copies). The writer sets its own level afterwards.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql)?;
    let tx = conn.unchecked_transaction().map_err(sql)?;
    let mut written = 0;
    {
        let mut upsert = tx
            .prepare(
                "INSERT INTO task_state (task_id, attempt, state, updated_at)
                 SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM tasks WHERE id = ?1)
                 ON CONFLICT(task_id) DO UPDATE SET attempt = excluded.attempt, state = excluded.state, updated_at = excluded.updated_at",
            )
            .map_err(sql)?;
        for (task, (attempt, state, at)) in latest {
            written += upsert
                .execute(rusqlite::params![task, attempt, state, at])
                .map_err(sql)?;
        }
    }
    commit_replay(tx, dir).map_err(sql)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql)?;
    let paths: Vec<PathBuf> = files.iter().chain(temporary).cloned().collect();
    // Synced before anything newer is written: a removal lost to a crash would replay older
    // states. One removed already (a replay run again) is no error.
    remove_files(dir, &paths, true).map_err(io)?;
    tracing::info!(
        files = files.len(),
        states = written,
        "state journal replayed"
    );
    Ok(written)
}

/// Commits a replay's transaction, made on the database beside `dir`.
fn commit_replay(tx: rusqlite::Transaction<'_>, dir: &Path) -> rusqlite::Result<()> {
    #[cfg(test)]
    if super::space::full::hit(dir) {
        drop(tx);
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        ));
    }
    #[cfg(not(test))]
    let _ = dir;
    tx.commit()
}

/// Why the writer failed to keep a state.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Sql(#[from] rusqlite::Error),
    /// An SQLite I/O error with the system's error number behind it, which SQLite's code does
    /// not always carry (a quota reached is a failed write to it): see
    /// `WriteError::with_errno`.
    #[error("{source} ({})", std::io::Error::from_raw_os_error(*errno))]
    SqlIo { source: rusqlite::Error, errno: i32 },
    #[error("state journal: {0}")]
    Journal(#[from] std::io::Error),
    /// A fold round could not make the next journal file, or list or remove the files it
    /// covered (a file descriptor not to be had, say): the journal is whole and keeps every
    /// state meanwhile, so the round is tried again (`States::piece`).
    #[error("state journal, folding: {0}")]
    Fold(std::io::Error),
    /// The data directory could not be made, or its lock file (`super::lock_dir`), or the
    /// file of a new database.
    #[error("data directory: {0}")]
    Dir(std::io::Error),
}

/// The file appends go to.
#[derive(Debug)]
struct Journal {
    dir: PathBuf,
    generation: u64,
    file: File,
    /// Bytes appended since the current round began (to the current file).
    grown: u64,
    /// Bytes of the files a round under way covers (deleted at its end).
    covered: u64,
    /// Synced at each append, and the directory at each removed file (a new file is synced
    /// whatever this says: [`Journal::create`]).
    sync: bool,
    /// A round begins once `grown` reaches this.
    fold_bytes: u64,
    /// Appends synced so far.
    synced: u64,
    buf: Vec<u8>,
    /// A group's frames carry at most this many bytes of changes ([`SPLIT_AT`]).
    split_at: usize,
}

impl Journal {
    /// Writes a group's frames, synced if the journal syncs.
    fn write_group(&mut self, now: &str, ops: &[Op<'_>]) -> std::io::Result<()> {
        // Each frame is replayed on its own: a group cut in two by a crash leaves states that
        // were never acknowledged, which a state's resend replaces anyway.
        for ops in frames_of(ops, self.split_at) {
            encode_frame(&mut self.buf, now, ops);
            self.file.write_all(&self.buf)?;
            self.grown += self.buf.len() as u64;
        }
        if self.sync {
            self.file.sync_data()?;
            self.synced += 1;
        }
        Ok(())
    }

    /// Creates the journal file of `generation` whole: its header is written and synced under
    /// a temporary name, which is then renamed into place, and the rename synced. A crash at
    /// any point leaves no file under the journal's name, or one with its header; so an empty
    /// journal file is damage, never a crash. This costs two syncs a file (about one a second
    /// while states flow), with either durability.
    fn create(dir: &Path, generation: u64) -> std::io::Result<File> {
        #[cfg(test)]
        if super::space::full::hit(dir) {
            return Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC));
        }
        let temporary = temporary_path(dir, generation);
        let made: std::io::Result<File> = (|| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(super::FILE_MODE)
                .open(&temporary)?;
            file.write_all(MAGIC)?;
            file.sync_data()?;
            std::fs::rename(&temporary, journal_path(dir, generation))?;
            sync_dir(dir)?;
            Ok(file)
        })();
        if made.is_err() {
            // Gone already once renamed; else the next start would remove it.
            let _ = std::fs::remove_file(&temporary);
        }
        made
    }
}

/// Where the journal was before a group's frames were appended.
#[derive(Debug, Clone, Copy)]
pub(super) struct Appended {
    at: u64,
    grown: u64,
}

/// What one piece of folding did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Piece {
    pub states_written: usize,
    /// Journal files deleted (the round is over).
    pub files_deleted: usize,
}

#[derive(Debug)]
struct Round {
    /// The journal generations up to this one are covered by the round.
    through: u64,
    /// The tasks to write, in task-id order (a piece touches only their pages).
    tasks: Vec<TaskId>,
    written: usize,
}

/// The writer's side of the states: the journal, the unfolded states and the fold.
#[derive(Debug)]
pub(super) struct States {
    journal: Journal,
    unfolded: Arc<Unfolded>,
    next_version: u64,
    round: Option<Round>,
    round_began: Instant,
    /// None when its thread could not start: the writer removes the files itself.
    reaper: Option<Reaper>,
    /// No round begins before this, after one failed ([`States::fold_failed`]).
    retry_at: Option<Instant>,
    /// Rounds that failed since the last that went through.
    failing: Option<Failing>,
}

/// Fold rounds failing one after another: said once, then every [`SAY_AGAIN`].
#[derive(Debug)]
struct Failing {
    since: Instant,
    said: Instant,
    failures: u64,
}

/// How often fold rounds that keep failing are said again.
const SAY_AGAIN: Duration = Duration::from_secs(60);

impl States {
    /// Starts a journal in `dir` (where [`replay`] left none) with `unfolded` empty; a fold
    /// round begins every [`FOLD_EVERY`] or `fold_bytes` of journal.
    pub fn start(
        dir: &Path,
        unfolded: Arc<Unfolded>,
        sync: bool,
        fold_bytes: u64,
    ) -> std::io::Result<Self> {
        let generation = journal_files(dir)?.last().map_or(1, |(g, _)| g + 1);
        let file = Journal::create(dir, generation)?;
        let reaper = Reaper::start(dir, sync)
            .inspect_err(|e| tracing::warn!(dir = %dir.display(), error = %e, "cannot start the journal reaper; the writer removes folded journals itself"))
            .ok();
        Ok(States {
            journal: Journal {
                dir: dir.to_owned(),
                generation,
                file,
                grown: 0,
                covered: 0,
                sync,
                fold_bytes,
                synced: 0,
                buf: Vec::new(),
                split_at: SPLIT_AT,
            },
            unfolded,
            next_version: 0,
            round: None,
            round_began: Instant::now(),
            reaper,
            retry_at: None,
            failing: None,
        })
    }

    /// Appends a group's changes to the journal: call before the group's commit. On an error
    /// nothing of the group stays: the file is cut back to where it was, so that the group may
    /// be appended again (a frame cut short with whole ones after it would read as damage).
    pub fn append(&mut self, now: &str, ops: &[Op<'_>]) -> std::io::Result<Appended> {
        let j = &mut self.journal;
        let before = Appended {
            at: j.file.stream_position()?,
            grown: j.grown,
        };
        if ops.is_empty() {
            return Ok(before);
        }
        match j.write_group(now, ops) {
            Ok(()) => Ok(before),
            Err(e) => match self.unappend(before) {
                Ok(()) => Err(e),
                // Not out of space any more, whatever `e` was: the writer stops.
                Err(cut) => Err(std::io::Error::other(format!(
                    "{e}; and the journal could not be cut back to before the group: {cut}"
                ))),
            },
        }
    }

    /// Takes a group's frames out of the journal again (`before` is what [`States::append`]
    /// returned for it): its commit failed. Left there, they would be replayed at the next
    /// start though never committed, a deletion's among them (which would drop the task's
    /// acknowledged states while its rows stay), and each retry of the group would append
    /// it again.
    pub fn unappend(&mut self, before: Appended) -> std::io::Result<()> {
        let j = &mut self.journal;
        j.grown = before.grown;
        j.file.set_len(before.at)?;
        j.file.seek(SeekFrom::Start(before.at))?;
        if j.sync {
            j.file.sync_data()?;
        }
        Ok(())
    }

    /// The group of `ops` committed: its states are the newest.
    pub fn committed(&mut self, now: &str, ops: &[Op<'_>]) {
        if ops.is_empty() {
            return;
        }
        let now: Arc<str> = now.into();
        let mut map = self.unfolded.lock();
        for op in ops {
            match *op {
                Op::State {
                    task,
                    attempt,
                    state,
                } => {
                    self.next_version += 1;
                    let p = Pending {
                        version: self.next_version,
                        attempt,
                        state: state.clone(),
                        updated_at: now.clone(),
                    };
                    match map.get_mut(task) {
                        Some(old) => *old = p,
                        None => {
                            map.insert(task.clone(), p);
                        }
                    }
                }
                Op::Forget(task) => {
                    map.remove(task);
                }
            }
        }
    }

    /// Appends synced so far (tests).
    #[cfg(test)]
    pub fn synced(&self) -> u64 {
        self.journal.synced
    }

    /// Splits a group's changes into frames past `bytes` instead of [`SPLIT_AT`] (tests).
    #[cfg(test)]
    pub fn split_frames_at(&mut self, bytes: usize) {
        self.journal.split_at = bytes;
    }

    /// Makes a round due now, if anything is unfolded, even one that failed just before (the
    /// writer stops; tests).
    pub fn begin_now(&mut self) {
        self.round_began = Instant::now()
            .checked_sub(FOLD_EVERY)
            .unwrap_or(self.round_began);
        self.retry_at = None;
    }

    /// Whether the next [`States::piece`] has anything to do.
    pub fn due(&self) -> bool {
        self.round.is_some()
            || ((self.journal.grown >= self.journal.fold_bytes
                || self.round_began.elapsed() >= FOLD_EVERY)
                && !self.unfolded.is_empty()
                && self.retry_at.is_none_or(|at| Instant::now() >= at))
    }

    /// A round could not make or remove its files (`e`): nothing waits on a fold, and every
    /// state is safe in the journal, which stays whole, so the round is tried again
    /// [`FOLD_EVERY`] later (not after each group: a try may cost a sync) rather than the
    /// coordinator stopped, as it was for a file descriptor not to be had for a moment in a
    /// storm of reconnections. Said once, then every [`SAY_AGAIN`] while it lasts.
    fn fold_failed(&mut self, e: std::io::Error) -> WriteError {
        let now = Instant::now();
        self.retry_at = Some(now + FOLD_EVERY);
        let dir = self.journal.dir.display();
        match &mut self.failing {
            None => {
                tracing::warn!(dir = %dir, error = %e, "a fold round of the task states failed; the journal keeps them, and the round is tried again in a second");
                self.failing = Some(Failing {
                    since: now,
                    said: now,
                    failures: 1,
                });
            }
            Some(f) => {
                f.failures += 1;
                if now.duration_since(f.said) >= SAY_AGAIN {
                    f.said = now;
                    tracing::warn!(dir = %dir, error = %e, failures = f.failures, failing_s = now.duration_since(f.since).as_secs(), "fold rounds of the task states still fail; the journal keeps growing until one goes through");
                }
            }
        }
        WriteError::Fold(e)
    }

    /// Does one piece of folding in a transaction of its own: begins a round if one is due
    /// (the appends move to a new journal file), writes up to [`PIECE_STATES`] states, and
    /// once the round has written them all deletes the files it covered.
    pub fn piece(&mut self, conn: &Connection) -> Result<Piece, WriteError> {
        if self.round.is_none() {
            if !self.due() {
                return Ok(Piece::default());
            }
            let through = self.journal.generation;
            let file = match Journal::create(&self.journal.dir, through + 1) {
                Ok(file) => file,
                // Nothing changed: the appends go on to the current file.
                Err(e) => return Err(self.fold_failed(e)),
            };
            let j = &mut self.journal;
            j.file = file;
            j.generation = through + 1;
            j.covered += j.grown + MAGIC.len() as u64;
            j.grown = 0;
            let mut tasks: Vec<TaskId> = self.unfolded.lock().keys().cloned().collect();
            tasks.sort_unstable();
            self.round = Some(Round {
                through,
                tasks,
                written: 0,
            });
            self.round_began = Instant::now();
        }
        let Some(round) = &mut self.round else {
            return Ok(Piece::default());
        };
        let end = (round.written + PIECE_STATES).min(round.tasks.len());
        let tasks = &round.tasks[round.written..end];
        // The newest state of each (newer than at the round's start, if one came since).
        let states: Vec<(&TaskId, Pending)> = {
            let map = self.unfolded.lock();
            tasks
                .iter()
                .filter_map(|t| map.get(t).map(|p| (t, p.clone())))
                .collect()
        };
        let mut piece = Piece::default();
        if !states.is_empty() {
            let tx = conn.unchecked_transaction()?;
            {
                let mut upsert = tx.prepare_cached(
                    "INSERT INTO task_state (task_id, attempt, state, updated_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(task_id) DO UPDATE SET attempt = excluded.attempt, state = excluded.state, updated_at = excluded.updated_at",
                )?;
                for (task, p) in &states {
                    upsert.execute(rusqlite::params![
                        task.as_str(),
                        p.attempt,
                        p.state.get(),
                        &*p.updated_at
                    ])?;
                }
            }
            tx.commit()?;
            // Only now may a read miss them in memory: it then reads them from the table.
            let mut map = self.unfolded.lock();
            for (task, p) in &states {
                if map.get(*task).is_some_and(|now| now.version == p.version) {
                    map.remove(*task);
                }
            }
            piece.states_written = states.len();
        }
        round.written = end;
        if round.written == round.tasks.len() {
            let through = round.through;
            self.round = None;
            // Its states are in `task_state`. Files it could not remove stay covered (and
            // counted in the journal's bytes): the next round removes them with its own.
            piece.files_deleted = match self.delete_through(through) {
                Ok(n) => n,
                Err(e) => return Err(self.fold_failed(e)),
            };
            self.journal.covered = 0;
            metrics::counter!(crate::metrics::STORE_FOLD_ROUNDS).increment(1);
            if let Some(f) = self.failing.take() {
                tracing::info!(dir = %self.journal.dir.display(), failures = f.failures, failed_for_ms = f.since.elapsed().as_millis() as u64, "fold rounds of the task states go through again");
            }
        }
        Ok(piece)
    }

    /// Bytes of the journal's files on disk.
    pub fn journal_bytes(&self) -> u64 {
        let j = &self.journal;
        j.covered + j.grown + MAGIC.len() as u64
    }

    /// Sets the gauges of the unfolded states and the journal's bytes.
    pub fn publish_metrics(&self) {
        metrics::gauge!(crate::metrics::STORE_JOURNAL_BYTES).set(self.journal_bytes() as f64);
        metrics::gauge!(crate::metrics::STORE_UNFOLDED_STATES).set(self.unfolded.len() as f64);
    }

    /// Deletes the journal files up to generation `through` (by the [`Reaper`], when it
    /// runs): every state they hold is in `task_state`, or older than one still unfolded
    /// (and journaled in a later file). Returns how many.
    fn delete_through(&mut self, through: u64) -> std::io::Result<usize> {
        let j = &self.journal;
        let paths: Vec<PathBuf> = journal_files(&j.dir)?
            .into_iter()
            .filter(|(generation, _)| *generation <= through)
            .map(|(_, path)| path)
            .collect();
        let n = paths.len();
        let left = match &self.reaper {
            Some(reaper) => reaper.remove(paths).err(),
            None => Some(paths),
        };
        if let Some(paths) = left {
            remove_files(&j.dir, &paths, j.sync)?;
        }
        Ok(n)
    }

    /// Waits until the journal files of finished rounds are removed.
    #[cfg(test)]
    pub fn settle(&self) {
        if let Some(reaper) = &self.reaper {
            reaper.settle();
        }
    }

    /// Folds everything unfolded and deletes every journal file (the writer stops). A round
    /// under way is finished first; states that came during it (in the journal file it left for
    /// the appends) are folded by another: a round just begun is not due again for a second,
    /// and the files deleted below would otherwise take the only copy of them.
    pub fn fold_all(&mut self, conn: &Connection) -> Result<(), WriteError> {
        loop {
            if self.round.is_none() {
                if self.unfolded.lock().is_empty() {
                    break;
                }
                self.begin_now();
            }
            self.piece(conn)?;
        }
        // The last files go here, after the reaper's: none is left behind for the next start.
        drop(self.reaper.take());
        let generation = self.journal.generation;
        self.delete_through(generation)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> TaskId {
        TaskId::parse(s).expect("id")
    }

    fn json(s: &str) -> StateJson {
        StateJson::from_text(s.to_owned()).expect("json")
    }

    /// Task `task`'s state `state` at attempt 1.
    fn st<'a>(task: &'a TaskId, state: &'a StateJson) -> Op<'a> {
        Op::State {
            task,
            attempt: 1,
            state,
        }
    }

    #[test]
    fn a_groups_changes_go_in_runs_of_at_most_the_split_each_op_once_in_order() {
        let (a, b, c) = (id("a"), id("b"), id("c"));
        let (small, big) = (json("1"), json(&format!("\"{}\"", "x".repeat(100))));
        let ops = [
            st(&a, &small),
            st(&b, &small),
            st(&c, &big),
            Op::Forget(&a),
            st(&b, &small),
        ];
        // 16 + 1 + 1 bytes for each small state, 118 for the big one, 4 for the forget.
        let runs: Vec<usize> = frames_of(&ops, 40).map(<[Op<'_>]>::len).collect();
        assert_eq!(
            runs,
            [2, 1, 2],
            "the big one alone, past the split by itself"
        );
        let all: Vec<usize> = frames_of(&ops, usize::MAX).map(<[Op<'_>]>::len).collect();
        assert_eq!(all, [5]);
        assert_eq!(frames_of(&ops, 0).count(), 5, "one op a frame at least");
        assert_eq!(frames_of(&[], 40).count(), 0);
    }

    fn frame(now: &str, ops: &[Op<'_>]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_frame(&mut buf, now, ops);
        buf
    }

    fn file_of(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        for f in frames {
            bytes.extend_from_slice(f);
        }
        bytes
    }

    fn read_bytes(bytes: &[u8]) -> Result<(FileRead, IdMap<String, Replayed>), StoreError> {
        read_bytes_of(bytes, true)
    }

    /// Reads `bytes` as a journal file of a data directory whose journals were created `whole`
    /// (or not: an older coordinator's).
    fn read_bytes_of(
        bytes: &[u8],
        whole: bool,
    ) -> Result<(FileRead, IdMap<String, Replayed>), StoreError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = journal_path(dir.path(), 1);
        std::fs::write(&path, bytes).expect("write");
        let mut map = IdMap::default();
        read_file(&path, &mut map, whole).map(|r| (r, map))
    }

    #[test]
    fn frames_read_back_in_order_with_deletions_and_the_newest_state_of_each_task() {
        let (a, b) = (id("a"), id("b"));
        let [n1, n2, n3, empty] = ["{\"n\":1}", "{\"n\":2}", "{\"n\":3}", "{}"].map(json);
        let st = |task, attempt, state| Op::State {
            task,
            attempt,
            state,
        };
        let bytes = file_of(&[
            frame("t1", &[st(&a, 1, &n1), st(&b, 1, &n1)]),
            frame("t2", &[Op::Forget(&b), st(&a, 2, &n2)]),
            frame("t3", &[st(&b, 3, &n3)]),
        ]);
        let (read, map) = read_bytes(&bytes).expect("read");
        assert_eq!(
            read,
            FileRead {
                frames: 3,
                torn_bytes: 0
            }
        );
        assert_eq!(map["a"], (2, "{\"n\":2}".to_owned(), "t2".to_owned()));
        assert_eq!(
            map["b"],
            (3, "{\"n\":3}".to_owned(), "t3".to_owned()),
            "a state after a deletion"
        );
        let (_, map) = read_bytes(&file_of(&[
            frame("t1", &[st(&b, 1, &empty)]),
            frame("t2", &[Op::Forget(&b)]),
        ]))
        .expect("read");
        assert!(map.is_empty(), "deleted last: no state");
    }

    #[test]
    fn a_torn_or_damaged_last_frame_ends_the_file_and_the_frames_before_it_count() {
        let a = id("a");
        let [one, two] = ["1", "2"].map(json);
        let whole = file_of(&[frame("t1", &[st(&a, &one)]), frame("t2", &[st(&a, &two)])]);
        let first_end = MAGIC.len() + frame("t1", &[st(&a, &one)]).len();
        // Cut anywhere inside the second frame: the first one's state.
        for cut in first_end..whole.len() {
            let (read, map) = read_bytes(&whole[..cut]).expect("read");
            assert_eq!(read.frames, 1, "cut at {cut}");
            assert_eq!(read.torn_bytes, (cut - first_end) as u64);
            assert_eq!(map["a"].1, "1");
        }
        // A flipped bit in the second frame's payload fails its CRC.
        let mut bad = whole.clone();
        *bad.last_mut().expect("byte") ^= 1;
        let (read, map) = read_bytes(&bad).expect("read");
        assert_eq!((read.frames, map["a"].1.as_str()), (1, "1"));
    }

    /// A group whose append fails part way (as on a full disk) leaves nothing of itself: the
    /// file is cut back to where it was, so the group appended again, and those after it, read
    /// back whole. (Left in, the part would be damage with whole frames after it: the next
    /// start would refuse the journal as corrupt.) The failure is real: a file size limit
    /// (RLIMIT_FSIZE, with SIGXFSZ ignored) in a child process of this test binary, where the
    /// limit touches no other test.
    #[test]
    fn a_group_whose_append_fails_part_way_leaves_nothing_and_is_appended_again() {
        const DONE: &str = "cut back, then appended again";
        let name = "store::states::tests::a_group_whose_append_fails_part_way_leaves_nothing_and_is_appended_again";
        if !super::super::tests::in_a_child(name, DONE) {
            return;
        }
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        use nix::sys::signal::{SigHandler, Signal, signal};
        // SAFETY: ignoring a signal installs no handler; this process runs this test alone.
        unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }.expect("ignore SIGXFSZ");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = States::start(dir.path(), Arc::default(), false, FOLD_BYTES).expect("start");
        let path = journal_path(dir.path(), s.journal.generation);
        let (a, b) = (id("a"), id("b"));
        let (one, big) = (json("1"), json(&format!("\"{}\"", "x".repeat(4096))));
        s.append("t1", &[st(&a, &one)]).expect("first group");
        let before = std::fs::metadata(&path).expect("journal").len();
        let (_, hard) = getrlimit(Resource::RLIMIT_FSIZE).expect("getrlimit");
        setrlimit(Resource::RLIMIT_FSIZE, before + 10, hard).expect("limit");
        let e = s.append("t2", &[st(&a, &big)]).expect_err("past the limit");
        assert_eq!(e.raw_os_error(), Some(nix::libc::EFBIG), "{e}");
        assert_eq!(std::fs::metadata(&path).expect("journal").len(), before);
        setrlimit(Resource::RLIMIT_FSIZE, hard, hard).expect("no limit");
        s.append("t2", &[st(&a, &big)]).expect("the group again");
        s.append("t3", &[st(&b, &one)]).expect("the next group");
        let mut map = IdMap::default();
        let read = read_file(&path, &mut map, true).expect("whole");
        assert_eq!(
            read,
            FileRead {
                frames: 3,
                torn_bytes: 0
            }
        );
        assert_eq!((map["a"].1.len(), map["b"].1.as_str()), (4098, "1"));
        println!("{DONE}");
    }

    #[test]
    fn a_file_shorter_than_its_header_is_corrupt_unless_an_older_coordinator_made_it() {
        for len in [0, 3, MAGIC.len() - 1] {
            let err = read_bytes(&MAGIC[..len]).expect_err("no journal file is made short");
            let msg = err.to_string();
            assert!(matches!(err, StoreError::CorruptJournal { .. }), "{msg}");
            assert!(msg.contains("task states it held were lost"), "{msg}");
            if len == 0 {
                assert!(msg.contains("empty (0 bytes)"), "{msg}");
            }
            // An older coordinator created the file in place: one that crashed before its
            // header was written left it short, with nothing in it.
            let (read, map) = read_bytes_of(&MAGIC[..len], false).expect("read");
            assert_eq!(
                (read.frames, read.torn_bytes, map.len()),
                (0, len as u64, 0)
            );
        }
        let (read, _) = read_bytes(MAGIC).expect("a header alone is a journal with no group");
        assert_eq!(read, FileRead::default());
    }

    #[test]
    fn a_new_journal_file_is_named_only_once_it_holds_its_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A creation that a crash cut short left its temporary file: it is overwritten.
        std::fs::write(temporary_path(dir.path(), 4), b"TS").expect("write");
        let mut file = Journal::create(dir.path(), 4).expect("create");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["states-4.journal"], "no temporary file left");
        assert_eq!(
            std::fs::read(journal_path(dir.path(), 4)).expect("read"),
            MAGIC
        );
        // Appends go after the header, to the file under its name.
        file.write_all(b"x").expect("append");
        assert_eq!(
            std::fs::metadata(journal_path(dir.path(), 4))
                .expect("meta")
                .len(),
            MAGIC.len() as u64 + 1
        );
        // A creation that fails leaves nothing under the journal's name.
        std::fs::create_dir(journal_path(dir.path(), 5)).expect("a directory in the way");
        Journal::create(dir.path(), 5).expect_err("cannot rename over a directory");
        assert!(!temporary_path(dir.path(), 5).exists());
        assert!(journal_path(dir.path(), 5).is_dir());
    }

    #[test]
    fn zeros_where_a_crash_left_unwritten_pages_end_the_file_like_a_torn_write() {
        let a = id("a");
        let [one, two] = ["1", "2"].map(json);
        let first = frame("t1", &[st(&a, &one)]);
        let whole = file_of(&[first.clone(), frame("t2", &[st(&a, &two)])]);
        // Zeros after the last frame (the file's size written, its pages not).
        let mut tail = whole.clone();
        tail.extend([0u8; 100]);
        let (read, map) = read_bytes(&tail).expect("a zeroed tail is torn, not corrupt");
        assert_eq!(
            (read.frames, read.torn_bytes, map["a"].1.as_str()),
            (2, 100, "2")
        );
        // A page of zeros inside a long second frame, a whole third frame after it (pages
        // written back out of order: the hole starts on a page boundary, mid-frame): read up
        // to the hole.
        let long = json(&format!("\"{}\"", "x".repeat(3 * PAGE)));
        let second = frame("t2", &[st(&a, &long)]);
        let mut hole = file_of(&[first.clone(), second, frame("t3", &[st(&a, &two)])]);
        hole[PAGE..2 * PAGE].fill(0);
        let (read, map) = read_bytes(&hole).expect("a zeroed page is torn, not corrupt");
        assert_eq!((read.frames, map["a"].1.as_str()), (1, "1"));
    }

    #[test]
    fn damage_with_whole_frames_after_it_is_refused_as_corrupt_not_read_as_torn() {
        let a = id("a");
        let [one, two, three] = ["1", "2", "3"].map(json);
        let first = frame("t1", &[st(&a, &one)]);
        let mut bytes = file_of(&[
            first.clone(),
            frame("t2", &[st(&a, &two)]),
            frame("t3", &[st(&a, &three)]),
        ]);
        // Garbage over the second frame's head: the third frame is still whole after it.
        let second_at = MAGIC.len() + first.len();
        bytes[second_at..second_at + 5].copy_from_slice(b"\x13\x37\xde\xad\x01");
        let err = read_bytes(&bytes).expect_err("damage in the middle");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("frame at byte {second_at} is damaged")),
            "{msg}"
        );
        assert!(msg.contains("not torn by a crash"), "{msg}");
    }

    #[test]
    fn a_wrong_header_or_a_bad_record_under_a_good_crc_is_refused_as_corrupt() {
        let mut bytes = file_of(&[]);
        bytes[0] = b'X';
        let err = read_bytes(&bytes).expect_err("bad header");
        assert!(
            err.to_string().contains("not a tether state journal"),
            "{err}"
        );
        // A record kind no writer makes, under a CRC that holds.
        let mut payload = Vec::new();
        put_str16(&mut payload, "t1");
        payload.extend_from_slice(&[9, 1, 0, b'a']);
        let mut f = (payload.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        f.extend_from_slice(&payload);
        let err = read_bytes(&file_of(&[f])).expect_err("bad record");
        assert!(err.to_string().contains("unknown record kind 9"), "{err}");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn the_reaper_removes_what_it_is_given_in_order_and_a_missing_file_is_no_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files: Vec<PathBuf> = (1..=3).map(|g| journal_path(dir.path(), g)).collect();
        for f in &files {
            std::fs::write(f, b"x").expect("write");
        }
        for sync in [false, true] {
            let reaper = Reaper::start(dir.path(), sync).expect("reaper");
            let mut given = files[..2].to_vec();
            given.push(dir.path().join("gone-already.journal"));
            reaper.remove(given).expect("handed over");
            reaper.settle();
            assert!(!files[0].exists() && !files[1].exists());
            assert!(files[2].exists(), "only what it was given");
            // Dropped, it still removes what it was handed.
            reaper.remove(vec![files[2].clone()]).expect("handed over");
            drop(reaper);
            assert!(!files[2].exists());
            for f in &files {
                std::fs::write(f, b"x").expect("write");
            }
        }
    }
}
