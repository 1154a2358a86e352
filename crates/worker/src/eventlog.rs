//! The worker's own record of what happened to its connection and its results, as JSON lines
//! appended to a file (`tether worker --event-log FILE`). End-to-end runs read it as ground
//! truth from the worker's side: when each session registered and when it was lost (and why),
//! and every result acknowledgement with its disposition.
//!
//! One line per event, written with a single `write` call and no user-space buffer, so a line
//! survives a SIGKILL of the process the moment the call returns (it is not fsynced: a machine
//! crash may lose the tail). A line cut short that way is cut off when the log is opened
//! again, so the next process's first line starts a line of its own. Lines carry wall-clock
//! times (RFC 3339, UTC) so that records of several processes on one machine can be compared.
//!
//! A write that fails is logged and the worker goes on, so a reader could not tell a lost line
//! from an event that never happened. Each record therefore carries its number in its process's
//! log (`n`, from 1 at each open: a gap is a lost line), and when the log is dropped (the agent
//! that owns it ended: a graceful stop, not a kill) it writes a last record, `stopped`, with
//! how many writes failed (`write_failures`) and how many rotations failed
//! (`rotation_failures`, below; both always written, 0 included; a `stopped` record of a log
//! older than the rotation count reads as 0). Logs written before the numbers have records
//! without `n`.
//!
//! The log is bounded, so that a worker running for months does not fill its disk: when a
//! record would take the file past its bound ([`EventLog::with_max_bytes`];
//! [`crate::config::DEFAULT_EVENT_LOG_MAX_BYTES`] unless told), the file is first renamed to
//! `FILE.1`, replacing the one there (one older file is kept: the two take at most about twice
//! the bound), and a new `FILE` begins with a `rotated` record. The numbers go on across a
//! rotation (the `rotated` record takes the next one), so `FILE.1` then `FILE` read as one
//! show no gap. A record alone longer than the bound still goes in whole, into a new file. A
//! rename that fails is logged and counted ([`EventLog::rotation_failures`], not a write
//! failure: no line is lost), and the records go on into the same file; the rotation is tried
//! again once it has grown by another bound's worth. So is one whose rename was done but whose
//! new file could not be made (no inode left): the records go on into `FILE.1`, and the next
//! try makes `FILE` alone. The `stopped` record counts these failures, so a reader of a log
//! that outgrew its bound can tell why.
//!
//! A rotation never cuts a line in two: the rename and every write are made under one lock,
//! and a write that began on the file before a rename ends in it (the handle follows the file,
//! now `FILE.1`). `FILE.1` can still end in a fragment, when a write failed partway and what
//! it left could not be cut off, and the next record rotated the file; [`read_all`] reads each
//! file's lines apart, so that fragment is one damaged line and `FILE`'s first record (its
//! `rotated` record) reads whole.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tether_proto::msg::Disposition;
use tether_proto::{Attempt, Seq, TaskId};

/// Why the event log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("cannot open the event log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The process started (a restart on the same log appends a new one).
    Started { boot_id: String },
    /// A session registered (the coordinator answered the registration).
    Registered { generation: u64, session_id: u64 },
    /// The coordinator said an operator drained this worker (its heartbeat replies'
    /// `draining`), or undrained it: once at each change.
    Drained { draining: bool },
    /// A registered session ended; `dead` when no frame came for the heartbeat timeout.
    SessionLost {
        generation: u64,
        reason: String,
        dead: bool,
    },
    /// A connection attempt ended before registration.
    AttemptFailed { generation: u64, reason: String },
    /// A frame from the coordinator failed its integrity tag and was dropped: one record a
    /// frame, so that damage on the path can be counted exactly (a session ends at the
    /// third, so a session writes at most that many).
    TagFailed {
        generation: u64,
        /// The session's failures so far, this one included.
        failures: u32,
    },
    /// The coordinator acknowledged a result.
    ResultAck {
        task_id: TaskId,
        /// The attempt of the acknowledged result, when it was still held (a repeated ack of a
        /// result already acknowledged finds nothing to look up).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<Attempt>,
        seq: Seq,
        disposition: Disposition,
    },
    /// The log's last record of this process, written when it is dropped (the agent ended):
    /// how many of its records could not be written, and how many of its rotations failed (the
    /// file grew past its bound meanwhile; no record was lost to them). A killed process
    /// writes none.
    Stopped {
        write_failures: u64,
        /// 0 when read from a log older than this count.
        #[serde(default)]
        rotation_failures: u64,
    },
    /// The first record of a file that follows a rotation: the records before this one (of
    /// this process, and of those before it) are in `previous`, the file renamed away when it
    /// had `bytes` bytes.
    Rotated { previous: String, bytes: u64 },
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub at: DateTime<Utc>,
    pub worker: String,
    /// Its number in its process's log, from 1 (`None` in logs older than the numbers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    #[serde(flatten)]
    pub event: Event,
}

/// An append-only JSON-lines file.
#[derive(Debug)]
pub struct EventLog {
    worker: String,
    file: Mutex<Appender>,
    path: PathBuf,
}

/// The file and what was written to it, under one lock so that numbers follow the lines'
/// order.
#[derive(Debug)]
struct Appender {
    file: Box<dyn Sink>,
    /// The number of the last record made (written or not).
    last: u64,
    /// Records that could not be encoded or written.
    failures: u64,
    /// The file's bound: a record that would take it past it goes into a new file.
    max_bytes: u64,
    /// Rotations that failed (the file was kept and written on).
    rotation_failures: u64,
    /// After a failed rotation, the size the file must reach before another is tried (0 when
    /// none failed since the last rotation): a rename that fails once mostly fails again, and
    /// trying at every record would log an error a record.
    retry_at: u64,
    /// A rotation renamed the file to `FILE.1` but could not make the new `FILE` (no inode
    /// left): the records go on into the renamed file, and the next try makes `FILE` alone. (A
    /// rename then would find no `FILE` and fail at every try, the bound lost for good.)
    renamed: bool,
    /// A unit test's full disk: making a new file fails.
    #[cfg(test)]
    refuse_create: bool,
    /// A unit test's disk that is full for a moment once a rotation made the new file: its
    /// first write fails.
    #[cfg(test)]
    new_file_fails_once: bool,
}

/// What the log appends to: its file, or in a unit test a writer that fails partway.
trait Sink: Write + Send + std::fmt::Debug {
    /// Bytes in it.
    fn len(&self) -> std::io::Result<u64>;
    /// Cuts it to `len` bytes.
    fn set_len(&self, len: u64) -> std::io::Result<()>;
}

impl Sink for File {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        File::set_len(self, len)
    }
}

impl EventLog {
    /// Opens `path` for appending, creating it. A last line without its newline (a write the
    /// previous process was killed during) is cut off first: appended to, it would glue this
    /// process's first record onto the fragment and damage both. The log is one process's:
    /// another writing it meanwhile could lose a line being written.
    pub fn open(path: &Path, worker: &str) -> Result<Self, EventLogError> {
        let err = |source| EventLogError::Open {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(crate::statedir::FILE_MODE)
            .open(path)
            .map_err(err)?;
        // An older worker made it with the umask's mode.
        crate::statedir::tighten(path, "task ids and the worker's errors");
        let len = file.metadata().map_err(err)?.len();
        let whole = whole_lines_len(&mut file, len).map_err(err)?;
        if whole < len {
            tracing::warn!(path = %path.display(), bytes = len - whole, "cutting off the event log's torn last line");
            file.set_len(whole).map_err(err)?;
            // The cut is made durable before anything is appended after it.
            file.sync_data().map_err(err)?;
        }
        Ok(Self {
            worker: worker.to_owned(),
            file: Mutex::new(Appender {
                file: Box::new(file),
                last: 0,
                failures: 0,
                max_bytes: crate::config::DEFAULT_EVENT_LOG_MAX_BYTES,
                rotation_failures: 0,
                retry_at: 0,
                renamed: false,
                #[cfg(test)]
                refuse_create: false,
                #[cfg(test)]
                new_file_fails_once: false,
            }),
            path: path.to_owned(),
        })
    }

    /// Bounds the file at `max_bytes` (see the module doc; at least 1: a bound of 0 is taken
    /// as 1, a file of one record each).
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        let out = self.file.get_mut().unwrap_or_else(|p| p.into_inner());
        out.max_bytes = max_bytes.max(1);
        self
    }

    /// Where a rotation moves the file: its name with `.1` appended.
    pub fn rotated_path(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }

    /// Appends one event. A failed write is logged and counted (the `stopped` record says how
    /// many), never fatal: the log is a witness, and the worker's job is to keep running. Its
    /// number is used up either way, so the line missing leaves a gap. What a write that
    /// failed partway (a full disk) left is cut off: the next line appended to that fragment
    /// would make two damaged lines of one failure. A record that would take the file past its
    /// bound first rotates it (see the module doc).
    pub fn record(&self, event: Event) {
        let mut out = self.file.lock().unwrap_or_else(|p| p.into_inner());
        out.last += 1;
        let mut rec = Record {
            at: Utc::now(),
            worker: self.worker.clone(),
            n: Some(out.last),
            event,
        };
        let Some(mut line) = encode(&mut out, &rec) else {
            return;
        };
        let mut before = out.file.len();
        if let Ok(len) = before
            && len > 0
            && len.saturating_add(line.len() as u64) > out.max_bytes
            && len >= out.retry_at
        {
            if let Some(rotated) = self.rotate(&mut out, len) {
                // The `rotated` record takes this record's number, and this record the
                // next.
                let marker = Record {
                    at: rec.at,
                    worker: self.worker.clone(),
                    n: rec.n,
                    event: rotated,
                };
                if let Some(marker) = encode(&mut out, &marker) {
                    self.append(&mut out, &marker, Ok(0));
                }
                out.last += 1;
                rec.n = Some(out.last);
            }
            // The `stopped` record counts what the rotation it tried itself cost too: the
            // rotation when it failed, the `rotated` record when that could not be written.
            if let Event::Stopped {
                write_failures,
                rotation_failures,
            } = &mut rec.event
            {
                *write_failures = out.failures;
                *rotation_failures = out.rotation_failures;
            }
            line = match encode(&mut out, &rec) {
                Some(line) => line,
                None => return,
            };
            before = out.file.len();
        }
        self.append(&mut out, &line, before);
    }

    /// Writes `line` with one call; `before` is the file's length before it, to cut back what
    /// a write that fails partway leaves.
    fn append(&self, out: &mut Appender, line: &[u8], before: std::io::Result<u64>) {
        if let Err(error) = out.file.write_all(line) {
            out.failures += 1;
            tracing::error!(path = %self.path.display(), %error, "cannot write the event log");
            // Cut back only what it left (nothing, when the write failed at once).
            if let Ok(before) = before
                && !out.file.len().is_ok_and(|now| now == before)
                && let Err(error) = out.file.set_len(before)
            {
                tracing::error!(path = %self.path.display(), %error, "cannot cut a record written in part off the event log; the next one is glued to it");
            }
        }
    }

    /// Renames the file (of `len` bytes) to [`Self::rotated_path`] and starts a new one in its
    /// place; the new file's first record, when it did. When it did not,
    /// the failure is logged and counted and the records go on into the file as it is (after
    /// a rename whose new file cannot be made: into the renamed one, and the next try makes the
    /// new file alone).
    fn rotate(&self, out: &mut Appender, len: u64) -> Option<Event> {
        let previous = Self::rotated_path(&self.path);
        let moved = match out.renamed {
            true => Ok(()),
            false => std::fs::rename(&self.path, &previous),
        };
        let made = moved.and_then(|()| {
            out.renamed = true;
            #[cfg(test)]
            if out.refuse_create {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC));
            }
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(crate::statedir::FILE_MODE)
                .open(&self.path)
        });
        match made {
            Ok(file) => {
                #[cfg(test)]
                let file = tests::FailsOnce {
                    file,
                    armed: std::mem::take(&mut out.new_file_fails_once),
                };
                out.file = Box::new(file);
                out.retry_at = 0;
                out.renamed = false;
                tracing::info!(path = %self.path.display(), previous = %previous.display(), bytes = len, "event log rotated");
                Some(Event::Rotated {
                    previous: previous.display().to_string(),
                    bytes: len,
                })
            }
            Err(error) => {
                out.rotation_failures += 1;
                out.retry_at = len.saturating_add(out.max_bytes);
                tracing::error!(path = %self.path.display(), previous = %previous.display(), %error, "cannot rotate the event log; it grows past its bound until the next try");
                None
            }
        }
    }

    /// Rotations that failed so far (see the module doc).
    pub fn rotation_failures(&self) -> u64 {
        self.file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rotation_failures
    }

    /// Records that could not be written so far.
    pub fn write_failures(&self) -> u64 {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).failures
    }
}

impl Drop for EventLog {
    /// The owner ended without being killed: the last record says how many writes failed, so
    /// that a reader can tell a whole log from one that lost lines, and how many rotations
    /// failed, so that one can tell why the file outgrew its bound.
    fn drop(&mut self) {
        let write_failures = self.write_failures();
        let rotation_failures = self.rotation_failures();
        self.record(Event::Stopped {
            write_failures,
            rotation_failures,
        });
    }
}

/// The line of `rec`, with its newline; `None` (counted and logged) when it cannot be encoded.
fn encode(out: &mut Appender, rec: &Record) -> Option<Vec<u8>> {
    match serde_json::to_vec(rec) {
        Ok(mut line) => {
            line.push(b'\n');
            Some(line)
        }
        Err(error) => {
            out.failures += 1;
            tracing::error!(%error, "cannot encode an event log record");
            None
        }
    }
}

/// The length of `file` (of `len` bytes) up to and with its last newline: 0 when it has none.
fn whole_lines_len(file: &mut File, len: u64) -> std::io::Result<u64> {
    const CHUNK: u64 = 4096;
    let mut end = len;
    let mut buf = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        // Both are within one chunk: the cast cannot truncate.
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// A log as read.
#[derive(Debug, Default)]
pub struct Read {
    pub records: Vec<Record>,
    /// The numbers (from 1) of lines that do not parse, other than a torn last line: damage.
    /// A line without its newline that is not the log's last (a fragment ending `FILE.1`,
    /// followed by `FILE`'s lines) is damage too.
    pub damaged: Vec<usize>,
    /// The last line lacks its newline and does not parse: a write cut short (the process was
    /// killed during it, and nothing was written after it).
    pub torn: bool,
}

/// Reads every record of a log's file (see [`parse`]).
pub fn read(path: &Path) -> std::io::Result<Read> {
    Ok(parse(&std::fs::read_to_string(path)?))
}

/// Reads every record a log keeps: those of the file it was last rotated to
/// ([`EventLog::rotated_path`], `FILE.1`), when there is one, then those of `FILE` (a damaged
/// line's number counts from the first line of `FILE.1`). Each file's lines are its own: a
/// fragment ending `FILE.1` (a write that failed partway, not cut off, then a rotation) is
/// one damaged line, and `FILE`'s first line reads whole; when `FILE` has no lines, that
/// fragment is the log's torn last line. `FILE` may be missing beside `FILE.1` (a rotation
/// renamed it and had not made the new one yet, or could not: the process was killed between
/// the two, or no inode was left): `FILE.1` is then the whole log. With neither, the error is
/// `FILE`'s.
pub fn read_all(path: &Path) -> std::io::Result<Read> {
    let not_found = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let rotated = match std::fs::read_to_string(EventLog::rotated_path(path)) {
        Ok(text) => Some(text),
        Err(e) if not_found(&e) => None,
        Err(e) => return Err(e),
    };
    match (rotated, std::fs::read_to_string(path)) {
        (Some(older), Ok(text)) => Ok(parse_files(&[&older, &text])),
        (None, Ok(text)) => Ok(parse(&text)),
        (Some(older), Err(e)) if not_found(&e) => Ok(parse(&older)),
        (_, Err(e)) => Err(e),
    }
}

/// The records of a log's text; lines that do not parse are skipped and told apart: a torn
/// last line, or damage.
pub fn parse(text: &str) -> Read {
    parse_files(&[text])
}

/// The records of a log's files' texts, in order, each split into lines of its own (a file's
/// last line without its newline is not joined to the next file's first line); lines are
/// numbered across them.
fn parse_files(texts: &[&str]) -> Read {
    let mut read = Read::default();
    let mut lines = texts
        .iter()
        .flat_map(|text| text.split_inclusive('\n'))
        .enumerate()
        .peekable();
    while let Some((n, line)) = lines.next() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(r) => read.records.push(r),
            Err(_) if !line.ends_with('\n') && lines.peek().is_none() => read.torn = true,
            Err(_) => read.damaged.push(n + 1),
        }
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new file of a rotation, whose first write fails when `armed` (the disk full for a
    /// moment): it writes nothing, as a write refused at once.
    #[derive(Debug)]
    pub(super) struct FailsOnce {
        pub(super) file: File,
        pub(super) armed: bool,
    }

    impl Write for FailsOnce {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            match std::mem::take(&mut self.armed) {
                true => Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC)),
                false => self.file.write(buf),
            }
        }

        fn flush(&mut self) -> std::io::Result<()> {
            self.file.flush()
        }
    }

    impl Sink for FailsOnce {
        fn len(&self) -> std::io::Result<u64> {
            Sink::len(&self.file)
        }

        fn set_len(&self, len: u64) -> std::io::Result<()> {
            Sink::set_len(&self.file, len)
        }
    }

    /// Appends a line cut short, as a process killed during its write leaves it.
    fn tear(path: &Path) {
        let mut f = OpenOptions::new().append(true).open(path).expect("reopen");
        f.write_all(b"{\"at\":\"20").expect("torn line");
    }

    /// A session's registration, the record these tests write first.
    fn registered() -> Event {
        Event::Registered {
            generation: 1,
            session_id: 7,
        }
    }

    #[test]
    fn records_round_trip_through_the_file_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open(&path, "w1").expect("open");
        log.record(registered());
        log.record(Event::ResultAck {
            task_id: TaskId::parse("t1").expect("id"),
            attempt: Some(Attempt(2)),
            seq: Seq(9),
            disposition: Disposition::Recorded,
        });
        drop(log);
        tear(&path);
        let read = read(&path).expect("read");
        assert!(read.torn && read.damaged.is_empty(), "{read:?}");
        let records = read.records;
        // The two, and the log's own last record.
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].worker, "w1");
        assert!(matches!(
            records[1].event,
            Event::ResultAck {
                attempt: Some(Attempt(2)),
                disposition: Disposition::Recorded,
                ..
            }
        ));
        let text = std::fs::read_to_string(&path).expect("text");
        assert!(text.starts_with("{\"at\":"), "{text}");
        assert!(text.contains("\"event\":\"result_ack\""), "{text}");
    }

    #[test]
    fn a_restart_cuts_off_a_torn_last_line_before_it_appends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open(&path, "w1").expect("open");
        log.record(registered());
        drop(log);
        tear(&path);
        let log = EventLog::open(&path, "w1").expect("open again");
        log.record(Event::Started {
            boot_id: "b2".into(),
        });
        let read = read(&path).expect("read");
        assert!(!read.torn && read.damaged.is_empty(), "{read:?}");
        let events: Vec<_> = read.records.into_iter().map(|r| r.event).collect();
        assert!(
            matches!(
                events[..],
                [
                    Event::Registered { .. },
                    Event::Stopped { .. },
                    Event::Started { .. }
                ]
            ),
            "{events:?}"
        );
    }

    fn numbered(path: &Path) -> Vec<(Option<u64>, Event)> {
        let read = read(path).expect("read");
        assert!(!read.torn && read.damaged.is_empty(), "{read:?}");
        read.records.into_iter().map(|r| (r.n, r.event)).collect()
    }

    /// Numbers count from 1 in each process's log (each open), and a log dropped (its agent
    /// ended, not killed) ends with how many writes failed: none here.
    #[test]
    fn records_are_numbered_from_one_at_each_open_and_a_dropped_log_says_it_lost_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let started = |b: &str| Event::Started { boot_id: b.into() };
        let log = EventLog::open(&path, "w1").expect("open");
        log.record(started("b1"));
        log.record(registered());
        drop(log);
        // A killed process's log is never dropped: no last record.
        let log = EventLog::open(&path, "w1").expect("open again");
        log.record(started("b2"));
        std::mem::forget(log);
        let stopped = |write_failures| Event::Stopped {
            write_failures,
            rotation_failures: 0,
        };
        let got = numbered(&path);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0], (Some(1), started("b1")));
        assert_eq!(got[1].0, Some(2));
        assert_eq!(got[2], (Some(3), stopped(0)));
        assert_eq!(got[3], (Some(1), started("b2")));
    }

    /// A write that fails uses up its number (the line missing leaves a gap) and is counted in
    /// the last record.
    #[test]
    fn a_failed_write_leaves_a_gap_in_the_numbers_and_is_counted_in_the_last_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open(&path, "w1").expect("open");
        log.record(Event::Started {
            boot_id: "b1".into(),
        });
        // A handle that cannot write, for one record.
        let writable = {
            let mut out = log.file.lock().expect("lock");
            let read_only = File::open(&path).expect("read-only");
            std::mem::replace(&mut out.file, Box::new(read_only))
        };
        log.record(registered());
        assert_eq!(log.write_failures(), 1);
        log.file.lock().expect("lock").file = writable;
        drop(log);
        let got = numbered(&path);
        let n: Vec<_> = got.iter().map(|(n, _)| *n).collect();
        assert_eq!(n, [Some(1), Some(3)], "{got:?}");
        assert_eq!(
            got[1].1,
            Event::Stopped {
                write_failures: 1,
                rotation_failures: 0
            }
        );
    }

    /// An in-memory disk: it takes every byte until `room` is set, then `room` more, then fails
    /// one write (as a full disk does: a short write, then `ENOSPC`), then takes every byte
    /// again.
    #[derive(Debug, Default)]
    struct Disk {
        bytes: Vec<u8>,
        room: Option<usize>,
    }

    /// The log's side of a [`Disk`] the test also holds.
    #[derive(Debug)]
    struct OnDisk(std::sync::Arc<Mutex<Disk>>);

    impl Write for OnDisk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut disk = self.0.lock().expect("lock");
            let n = match disk.room {
                Some(0) => {
                    disk.room = None;
                    return Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC));
                }
                Some(room) => buf.len().min(room),
                None => buf.len(),
            };
            if let Some(room) = &mut disk.room {
                *room -= n;
            }
            disk.bytes.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink for OnDisk {
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.0.lock().expect("lock").bytes.len() as u64)
        }

        fn set_len(&self, len: u64) -> std::io::Result<()> {
            let len = usize::try_from(len).expect("len");
            self.0.lock().expect("lock").bytes.truncate(len);
            Ok(())
        }
    }

    /// A write that fails partway (the disk fills up 10 bytes into the line) leaves no
    /// fragment for the next line to be glued to: that line is missing and counted, and every
    /// other line reads.
    #[test]
    fn a_write_that_fails_partway_leaves_no_fragment_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EventLog::open(&dir.path().join("events.jsonl"), "w1").expect("open");
        let disk = std::sync::Arc::new(Mutex::new(Disk::default()));
        log.file.lock().expect("lock").file = Box::new(OnDisk(disk.clone()));
        log.record(registered());
        disk.lock().expect("lock").room = Some(10);
        log.record(registered());
        log.record(Event::Started {
            boot_id: "b1".into(),
        });
        assert_eq!(log.write_failures(), 1);
        drop(log);
        let text = String::from_utf8(disk.lock().expect("lock").bytes.clone()).expect("utf-8");
        let read = parse(&text);
        assert!(read.damaged.is_empty() && !read.torn, "{read:?}\n{text}");
        // The second line is the one missing: a gap, and the last record counts it.
        let n: Vec<_> = read.records.iter().map(|r| r.n).collect();
        assert_eq!(n, [Some(1), Some(3), Some(4)], "{text}");
        assert_eq!(
            read.records[2].event,
            Event::Stopped {
                write_failures: 1,
                rotation_failures: 0
            }
        );
    }

    /// Records until `done` holds, at most `most` of them; how many it took.
    fn record_until(log: &EventLog, most: usize, done: impl Fn(&EventLog) -> bool) -> usize {
        for i in 1..=most {
            log.record(registered());
            if done(log) {
                return i;
            }
        }
        panic!("not done after {most} records");
    }

    /// Whether the log's file starts with a `rotated` record.
    fn follows_a_rotation(path: &Path) -> bool {
        numbered(path)
            .first()
            .is_some_and(|(_, e)| matches!(e, Event::Rotated { .. }))
    }

    /// A record that would take the file past its bound goes into a new file, which starts
    /// with a `rotated` record naming the old one; the numbers go on across it (the old file
    /// then the new one read as one have no gap), and a second rotation replaces the older
    /// file: one is kept.
    #[test]
    fn a_record_past_the_bound_starts_a_new_file_whose_numbers_go_on_and_one_older_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let older = EventLog::rotated_path(&path);
        assert_eq!(older, dir.path().join("events.jsonl.1"));
        const BOUND: u64 = 500;
        let log = EventLog::open(&path, "w1")
            .expect("open")
            .with_max_bytes(BOUND);
        let first = record_until(&log, 100, |_| older.exists());
        // Rotated at the bound, not before: the file renamed held the records before, and the
        // one that rotated it would have taken it past the bound.
        let old_len = std::fs::metadata(&older).expect("older").len();
        let old = numbered(&older);
        let new = numbered(&path);
        assert_eq!(old.len(), first - 1, "{old:?}");
        assert!(old_len <= BOUND, "{old_len}");
        let text = std::fs::read_to_string(&path).expect("text");
        let mut lines = text.lines();
        let marker = lines.next().expect("marker");
        let rotating = lines.next().expect("the record that rotated it").len() as u64 + 1;
        assert!(old_len + rotating > BOUND, "{old_len} + {rotating}");
        assert_eq!(
            new[0],
            (
                Some(first as u64),
                Event::Rotated {
                    previous: older.display().to_string(),
                    bytes: old_len,
                }
            ),
            "{marker}"
        );
        let numbers = |recs: &[(Option<u64>, Event)]| -> Vec<u64> {
            recs.iter().map(|(n, _)| n.expect("numbered")).collect()
        };
        let all: Vec<u64> = numbers(&old).into_iter().chain(numbers(&new)).collect();
        assert_eq!(all, (1..=first as u64 + 1).collect::<Vec<_>>());
        // The next rotation replaces the older file with the newer one, so the two files
        // together still read without a gap, and nothing else is kept.
        let last_of_first = numbers(&new).last().copied().expect("a record");
        record_until(&log, 100, |_| {
            numbers(&numbered(&older)).first() == Some(&(first as u64))
        });
        let old = numbers(&numbered(&older));
        let new = numbers(&numbered(&path));
        assert!(*old.last().expect("old") >= last_of_first, "{old:?}");
        let all: Vec<u64> = old.iter().chain(&new).copied().collect();
        let from = first as u64;
        assert_eq!(all, (from..from + all.len() as u64).collect::<Vec<_>>());
        assert!(follows_a_rotation(&path));
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["events.jsonl", "events.jsonl.1"]);
        assert_eq!((log.write_failures(), log.rotation_failures()), (0, 0));
    }

    /// `read_all` reads the file rotated to, then the log's file: every record kept, in
    /// order, numbered without a gap; `read` reads the log's file alone.
    #[test]
    fn read_all_reads_the_rotated_file_then_the_log_s_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let all = || {
            let read = read_all(&path).expect("read_all");
            assert!(!read.torn && read.damaged.is_empty(), "{read:?}");
            read.records
                .iter()
                .map(|r| r.n.expect("numbered"))
                .collect::<Vec<_>>()
        };
        let log = EventLog::open(&path, "w1").expect("open");
        log.record(registered());
        assert_eq!(all(), [1], "no rotated file: the log's own");
        let log = log.with_max_bytes(500);
        let first = record_until(&log, 100, |_| EventLog::rotated_path(&path).exists());
        // The first record, those before the rotation, the `rotated` record and the one
        // that rotated the file.
        let numbers = all();
        assert_eq!(numbers, (1..=first as u64 + 2).collect::<Vec<_>>());
        assert!(numbered(&path).len() < numbers.len(), "read takes one file");
        // Renamed, and the new file not made yet: the rotated file is the whole log.
        drop(log);
        let every = all();
        std::fs::rename(&path, EventLog::rotated_path(&path)).expect("rename");
        let older = numbered(&EventLog::rotated_path(&path)).len();
        assert_eq!(
            all(),
            every[every.len() - older..],
            "the rotated file alone"
        );
        std::fs::remove_file(EventLog::rotated_path(&path)).expect("remove");
        let e = read_all(&path).expect_err("no log at all");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }

    /// A record alone longer than the bound still goes in whole, each into a new file.
    #[test]
    fn a_record_longer_than_the_bound_goes_in_whole_into_a_file_of_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open(&path, "w1")
            .expect("open")
            .with_max_bytes(10);
        log.record(registered());
        log.record(registered());
        log.record(registered());
        drop(log);
        let got = numbered(&path);
        // Each record rotated the file before it: the last file holds the rotation the log's
        // last record made and that record, the older one the third record's.
        assert!(
            matches!(
                got[..],
                [
                    (Some(6), Event::Rotated { .. }),
                    (Some(7), Event::Stopped { .. })
                ]
            ),
            "{got:?}"
        );
        let older = numbered(&EventLog::rotated_path(&path));
        assert!(
            matches!(
                older[..],
                [
                    (Some(4), Event::Rotated { .. }),
                    (Some(5), Event::Registered { .. })
                ]
            ),
            "{older:?}"
        );
    }

    /// Under the usual umask (022) the log and the files its rotations make are the worker's
    /// user's alone (0600), and a log an older worker left open to others is made so at open.
    #[test]
    fn the_log_and_the_files_its_rotations_make_are_the_users_alone() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let was = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        std::fs::write(&path, b"").expect("an older worker's log");
        let older_mode = mode(&path);
        let log = EventLog::open(&path, "w1")
            .expect("open")
            .with_max_bytes(10);
        let at_open = mode(&path);
        for _ in 0..3 {
            log.record(registered());
        }
        drop(log);
        nix::sys::stat::umask(was);
        assert_eq!(older_mode, 0o644, "made with the umask's mode");
        assert_eq!(at_open, 0o600, "made private at open");
        let rotated = EventLog::rotated_path(&path);
        assert_eq!((mode(&path), mode(&rotated)), (0o600, 0o600));
    }

    /// A rotation whose rename fails (a directory stands where the older file goes) is
    /// counted, not as a lost line: the records go on into the same file, numbered without a
    /// gap, and the rotation is not tried again at the next record but once the file has grown
    /// by another bound's worth; it is done then, when the rename can be.
    #[test]
    fn a_rotation_that_fails_is_counted_and_the_log_goes_on_in_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let older = EventLog::rotated_path(&path);
        std::fs::create_dir(&older).expect("a directory in the way");
        std::fs::write(older.join("x"), b"x").expect("not empty");
        const BOUND: u64 = 500;
        let log = EventLog::open(&path, "w1")
            .expect("open")
            .with_max_bytes(BOUND);
        record_until(&log, 100, |l| l.rotation_failures() == 1);
        let failed_at = std::fs::metadata(&path).expect("len").len();
        log.record(registered());
        assert_eq!(log.rotation_failures(), 1, "tried again at the next record");
        record_until(&log, 100, |l| l.rotation_failures() == 2);
        let len = std::fs::metadata(&path).expect("len").len();
        assert!(len >= failed_at + BOUND, "{failed_at} then {len}");
        let got = numbered(&path);
        let n: Vec<_> = got.iter().map(|(n, _)| n.expect("numbered")).collect();
        assert_eq!(n, (1..=n.len() as u64).collect::<Vec<_>>());
        assert_eq!(log.write_failures(), 0);
        // The way cleared, the next try rotates.
        std::fs::remove_dir_all(&older).expect("clear the way");
        record_until(&log, 100, |_| older.is_file());
        assert_eq!(log.rotation_failures(), 2);
        let last = n.last().copied().expect("a record");
        let old: Vec<_> = numbered(&older).into_iter().map(|(n, _)| n).collect();
        assert_eq!(old.first(), Some(&Some(1)));
        assert!(old.last().is_some_and(|l| l.is_some_and(|l| l >= last)));
        assert!(follows_a_rotation(&path));
    }

    /// A rotation that renamed the file but could not make the new one (no inode left) is
    /// counted, and the records go on into the renamed file, numbered without a gap; the next
    /// try, a bound's worth later, makes the new file alone and the log is bounded again. (It
    /// renamed again: no file to rename, it failed at every try, and the log grew in `FILE.1`
    /// for good.)
    #[test]
    fn a_rotation_whose_new_file_cannot_be_made_makes_it_at_the_next_try() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let older = EventLog::rotated_path(&path);
        const BOUND: u64 = 500;
        let log = EventLog::open(&path, "w1")
            .expect("open")
            .with_max_bytes(BOUND);
        log.file.lock().expect("lock").refuse_create = true;
        record_until(&log, 100, |l| l.rotation_failures() == 1);
        assert!(older.is_file() && !path.exists(), "renamed, no new file");
        log.file.lock().expect("lock").refuse_create = false;
        record_until(&log, 100, |_| path.exists());
        assert_eq!(log.rotation_failures(), 1, "made at the next try");
        assert!(follows_a_rotation(&path));
        let old_len = std::fs::metadata(&older).expect("older").len();
        assert!(old_len >= BOUND, "{old_len}: written on after the failure");
        let all: Vec<u64> = numbered(&older)
            .into_iter()
            .chain(numbered(&path))
            .map(|(n, _)| n.expect("numbered"))
            .collect();
        assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>());
        assert_eq!(log.write_failures(), 0);
        // Bounded again: the next rotation replaces the older file.
        record_until(&log, 100, |_| {
            numbered(&older)
                .first()
                .is_some_and(|(_, e)| matches!(e, Event::Rotated { .. }))
        });
        assert_eq!(log.rotation_failures(), 1);
    }

    /// The `stopped` record counts the rotations that failed, those before it and the one it
    /// tried itself, so that a reader of a stopped worker's log can tell that the file grew
    /// past its bound; a `stopped` record written before the count reads as 0.
    #[test]
    fn the_stopped_record_counts_the_rotations_that_failed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stopped = |path: &Path| {
            let got = numbered(path);
            got.last().expect("a record").1.clone()
        };
        let blocked = |path: &Path| {
            let older = EventLog::rotated_path(path);
            std::fs::create_dir(&older).expect("a directory in the way");
            std::fs::write(older.join("x"), b"x").expect("not empty");
        };
        let path = dir.path().join("events.jsonl");
        blocked(&path);
        let log = EventLog::open(&path, "w1")
            .expect("open")
            .with_max_bytes(500);
        record_until(&log, 100, |l| l.rotation_failures() == 1);
        // The next try is a bound's worth on: the `stopped` record does not try.
        drop(log);
        let want = |rotation_failures| Event::Stopped {
            write_failures: 0,
            rotation_failures,
        };
        assert_eq!(stopped(&path), want(1));
        // A bound of one record a file: the `stopped` record's own rotation fails, and counts.
        let path = dir.path().join("own.jsonl");
        blocked(&path);
        let log = EventLog::open(&path, "w1").expect("open").with_max_bytes(1);
        log.record(registered());
        assert_eq!(log.rotation_failures(), 0, "an empty file is not rotated");
        drop(log);
        assert_eq!(stopped(&path), want(1));
        // The `stopped` record's own rotation goes through, but its `rotated` record cannot be
        // written: that gap is counted in the same `stopped` record.
        let path = dir.path().join("marker.jsonl");
        let log = EventLog::open(&path, "w1").expect("open").with_max_bytes(1);
        log.record(registered());
        log.file.lock().expect("lock").new_file_fails_once = true;
        drop(log);
        let got = numbered(&path);
        assert_eq!(
            got,
            [(
                Some(3),
                Event::Stopped {
                    write_failures: 1,
                    rotation_failures: 0
                }
            )],
            "the rotated record (2) is missing, and counted"
        );
        let old = r#"{"at":"2026-01-02T03:04:05Z","worker":"w1","n":3,"event":"stopped","write_failures":2}"#;
        let read = parse(&format!("{old}\n"));
        assert_eq!(
            read.records[0].event,
            Event::Stopped {
                write_failures: 2,
                rotation_failures: 0
            }
        );
    }

    /// A fragment at the end of the file (a write that failed partway and could not be cut
    /// off) that the next record rotates away to `FILE.1` is read as one damaged line:
    /// `read_all` reads `FILE`'s first line whole (the `rotated` record), not glued to the
    /// fragment. With `FILE` missing or empty, the fragment is the log's torn last line.
    #[test]
    fn a_fragment_ending_the_rotated_file_is_one_damaged_line_and_the_next_file_reads_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open(&path, "w1").expect("open");
        for _ in 0..3 {
            log.record(registered());
        }
        // The fragment is appended behind the log's back; its next record rotates the file.
        tear(&path);
        let log = log.with_max_bytes(1);
        log.record(registered());
        std::mem::forget(log);
        assert!(follows_a_rotation(&path));
        let read = read_all(&path).expect("read_all");
        assert_eq!(read.damaged, [4], "{read:?}");
        assert!(!read.torn, "{read:?}");
        let n: Vec<_> = read.records.iter().map(|r| r.n).collect();
        assert_eq!(n, [Some(1), Some(2), Some(3), Some(4), Some(5)], "{read:?}");
        assert!(matches!(read.records[3].event, Event::Rotated { .. }));
        // Nothing after the fragment: it is the log's torn last line.
        std::fs::write(&path, b"").expect("empty");
        let read = read_all(&path).expect("read_all");
        assert!(read.torn && read.damaged.is_empty(), "{read:?}");
        assert_eq!(read.records.len(), 3);
        std::fs::remove_file(&path).expect("remove");
        let read = read_all(&path).expect("read_all");
        assert!(read.torn && read.damaged.is_empty(), "{read:?}");
        assert_eq!(read.records.len(), 3);
    }

    /// A rotation never cuts a line in two, even with records made from several threads at
    /// once: the rename and the writes take turns under one lock. Each file reads whole, and
    /// the two read as one without a gap. (Rotation made no torn line before either: this
    /// guards it.)
    #[test]
    fn records_from_several_threads_rotate_without_a_line_cut_in_two() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let log = EventLog::open(&path, "w1")
            .expect("open")
            .with_max_bytes(2_000);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        log.record(registered());
                    }
                });
            }
        });
        assert_eq!((log.write_failures(), log.rotation_failures()), (0, 0));
        drop(log);
        let older = numbered(&EventLog::rotated_path(&path));
        let newer = numbered(&path);
        assert!(matches!(newer[0].1, Event::Rotated { .. }), "{newer:?}");
        let n: Vec<u64> = older
            .iter()
            .chain(&newer)
            .map(|(n, _)| n.expect("numbered"))
            .collect();
        let first = n[0];
        assert_eq!(n, (first..first + n.len() as u64).collect::<Vec<_>>());
        assert!(matches!(
            newer.last().expect("a record").1,
            Event::Stopped { .. }
        ));
    }

    /// A log written before records were numbered still reads.
    #[test]
    fn a_record_without_a_number_still_reads() {
        let old = r#"{"at":"2026-01-02T03:04:05Z","worker":"w1","event":"started","boot_id":"b1"}"#;
        let read = parse(&format!("{old}\n"));
        assert!(read.damaged.is_empty(), "{read:?}");
        assert_eq!(read.records[0].n, None);
        assert!(matches!(read.records[0].event, Event::Started { .. }));
    }

    #[test]
    fn a_log_that_is_only_a_fragment_is_cut_to_nothing_and_a_whole_one_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        // Longer than a chunk of the backwards search, and no newline at all.
        std::fs::write(&path, vec![b'x'; 10_000]).expect("fragment");
        let log = EventLog::open(&path, "w1").expect("open");
        log.record(Event::Started {
            boot_id: "b1".into(),
        });
        let text = std::fs::read_to_string(&path).expect("text");
        assert!(
            text.starts_with("{\"at\":") && text.ends_with('\n'),
            "{text}"
        );
        // Whole lines are kept as they are; a fragment longer than a chunk of the backwards
        // search is cut back to the newline before it. (The logs are forgotten, not dropped:
        // a dropped one appends its `stopped` record.)
        let mut whole = vec![b'y'; 4095];
        whole.push(b'\n');
        std::fs::write(&path, &whole).expect("whole lines");
        std::mem::forget(EventLog::open(&path, "w1").expect("open"));
        assert_eq!(std::fs::read(&path).expect("bytes"), whole);
        let mut torn = whole.clone();
        torn.extend(vec![b'z'; 8191]);
        std::fs::write(&path, &torn).expect("torn");
        std::mem::forget(EventLog::open(&path, "w1").expect("open"));
        assert_eq!(std::fs::read(&path).expect("bytes"), whole);
    }
}
